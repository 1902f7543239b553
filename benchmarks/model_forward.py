"""Forward and generation throughput of slim_jax's Llama against transformers' PyTorch Llama.

Both run the same random checkpoint (made with transformers, saved, loaded into slim_jax), side by
side in one process on the same machine, fp32; the logits are compared first so that the timing is
of two implementations of the same function. Optionally also times greedy generation of the real
llama2.c model (`$SLIM_JAX_DATA_DIR/tinystories260k`).

Run (prints a markdown table and one JSON line):
    python benchmarks/model_forward.py
    python benchmarks/model_forward.py --hidden 512 --layers 8 --batch 8 --seq 256

Numbers: forward tokens/s = batch * seq / time of one forward (after compilation); generation
tokens/s = batch * new tokens / time of one `generate` call (prefill included, compilation
excluded, no early stop). Times are the best of the repeats (the median is in the JSON too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slim_jax.models.generate import generate
from slim_jax.models.llama import Llama


def _seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(best, median) wall time of each function after one warm-up call (compilation), the
    functions taking turns so that both see the same background load. On a shared machine the
    best time is the least disturbed one, so the tables report it; the JSON has both."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def _rates(prefix: str, tokens: int, seconds: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (best, median) in seconds.items():
        out[f"{name}_{prefix}_tok_s"] = tokens / best
        out[f"{name}_{prefix}_tok_s_median"] = tokens / median
    return out


def _hf_model(args: argparse.Namespace, folder: Path) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def bench_forward(args: argparse.Namespace, hf: transformers.LlamaForCausalLM, ours: Llama):
    tokens = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.seq))
    torch_tokens = torch.tensor(tokens)
    jax_tokens = jnp.asarray(tokens)
    forward = nnx.jit(lambda m, t: m(t))

    with torch.no_grad():
        ref = hf(torch_tokens).logits.numpy()
    got = np.asarray(forward(ours, jax_tokens))
    max_diff = float(np.abs(got - ref).max())

    def run_torch():
        with torch.no_grad():
            hf(torch_tokens)

    def run_jax():
        forward(ours, jax_tokens).block_until_ready()

    seconds = _seconds({"torch": run_torch, "slim_jax": run_jax}, args.repeats)
    return {"max_abs_logit_diff": max_diff,
            **_rates("forward", args.batch * args.seq, seconds)}


def bench_generate(args: argparse.Namespace, hf: transformers.LlamaForCausalLM, ours: Llama):
    prompts = np.random.default_rng(1).integers(3, args.vocab, (args.batch, args.prompt))
    torch_prompts = torch.tensor(prompts)
    rows = prompts.tolist()

    def run_torch():
        with torch.no_grad():
            hf.generate(torch_prompts, attention_mask=torch.ones_like(torch_prompts),
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        do_sample=False, pad_token_id=0)

    def run_jax():
        generate(ours, rows, max_new_tokens=args.new_tokens, stop_ids=())

    seconds = _seconds({"torch": run_torch, "slim_jax": run_jax}, max(1, args.repeats // 3))
    return _rates("generate", args.batch * args.new_tokens, seconds)


def bench_llama2c(args: argparse.Namespace) -> dict[str, float] | None:
    from slim_jax.errors import DataError
    from slim_jax.models.llama2c import load_llama2c
    from slim_jax.settings import data_dir

    try:
        folder = data_dir(args.data_dir, required="tinystories260k") / "tinystories260k"
    except DataError:
        return None
    model, tok = load_llama2c(folder / "checkpoint_v1.bin")

    def run():
        generate(model, [""] * args.batch, tokenizer=tok, max_new_tokens=256, stop_ids=())

    return _rates("generate", args.batch * 256, _seconds({"tinystories260k": run}, 3))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="forward sequence length")
    parser.add_argument("--prompt", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data-dir", default=None, help="data folder (default $SLIM_JAX_DATA_DIR)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        hf = _hf_model(args, Path(tmp))
        ours = Llama.from_pretrained(tmp)
    result: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
                   f"{os.cpu_count()} cores".replace("  ", " "),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("repeats", "data_dir")},
    }
    result.update(bench_forward(args, hf, ours))
    result.update(bench_generate(args, hf, ours))
    result.update(bench_llama2c(args) or {})

    print(f"| measure | slim_jax ({result['jax_backend']}) | transformers (torch CPU) |")
    print("|---|---|---|")
    print(f"| forward tokens/s | {result['slim_jax_forward_tok_s']:,.0f} | "
          f"{result['torch_forward_tok_s']:,.0f} |")
    print(f"| greedy generation tokens/s | {result['slim_jax_generate_tok_s']:,.0f} | "
          f"{result['torch_generate_tok_s']:,.0f} |")
    if "tinystories260k_generate_tok_s" in result:
        print(f"| tinystories260k generation tokens/s | "
              f"{result['tinystories260k_generate_tok_s']:,.0f} | - |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
