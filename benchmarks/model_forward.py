"""Forward and greedy-generation throughput of slim_jax's models against transformers' PyTorch ones.

Both sides run the same random checkpoint (made with transformers, saved, loaded into slim_jax),
in one process, fp32, with the same number of threads (benchmarks/harness.py pins them); the
logits are compared first, so the timing is of two implementations of one function. The timed
calls alternate round robin; rows give median [inter-quartile range] and the speed ratio as the
median of the per-round ratios (min-max). A busy machine is refused (see --allow-busy).

    python benchmarks/model_forward.py                          # Llama, hidden 256, 4 layers
    python benchmarks/model_forward.py --hidden 512 --layers 8 --batch 8 --seq 256
    python benchmarks/model_forward.py --model t5               # T5 (flan-t5 style, gated-gelu)
    python benchmarks/model_forward.py --threads 1              # the one-core case

Numbers: forward tokens/s = batch * seq / time of one forward (after compilation; for T5, seq is
the encoder length and the decoder reads --dec-seq tokens); generation tokens/s = batch * new
tokens / time of one `generate` call (prefill included, compilation excluded, no early stop).
With --model llama and `$SLIM_JAX_DATA_DIR/tinystories260k`, the real llama2.c model's generation
speed is printed too (slim_jax only). About a minute at the defaults on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness  # benchmarks/harness.py, beside this file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama", "t5"), default="llama")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="layers (T5: per stack)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4, help="Llama only")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256,
                        help="forward sequence (T5: encoder) length")
    parser.add_argument("--dec-seq", type=int, default=64, help="T5 forward decoder length")
    parser.add_argument("--prompt", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data-dir", default=None, help="data folder (default $SLIM_JAX_DATA_DIR)")
    harness.add_arguments(parser, repeats=10)
    return parser.parse_args(argv)


def hf_and_ours(args: argparse.Namespace, folder: Path) -> tuple[Any, Any]:
    """A random transformers model of the configured shape, and slim_jax's load of its files."""
    import torch
    import transformers

    torch.manual_seed(0)
    if args.model == "llama":
        from slim_jax.models.llama import Llama

        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        hf = transformers.LlamaForCausalLM(config).eval()
        hf.save_pretrained(folder)
        return hf, Llama.from_pretrained(folder)
    from slim_jax.models.t5 import T5

    config = transformers.T5Config(
        vocab_size=args.vocab, d_model=args.hidden, d_kv=args.hidden // args.heads,
        d_ff=args.hidden * 11 // 4, num_layers=args.layers, num_decoder_layers=args.layers,
        num_heads=args.heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(folder)
    return hf, T5.from_pretrained(folder)


def forward_fns(args: argparse.Namespace, hf: Any, ours: Any
                ) -> tuple[dict[str, Callable[[], object]], float, int]:
    """Blocking forward calls of both sides, the largest logit difference, and tokens per call."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    rng = np.random.default_rng(0)
    enc = rng.integers(3, args.vocab, (args.batch, args.seq))
    if args.model == "llama":
        torch_in = {"input_ids": torch.tensor(enc)}
        jax_in: tuple = (jnp.asarray(enc),)
    else:
        dec = rng.integers(3, args.vocab, (args.batch, args.dec_seq))
        torch_in = {"input_ids": torch.tensor(enc), "decoder_input_ids": torch.tensor(dec)}
        jax_in = (jnp.asarray(enc), jnp.asarray(dec))
    forward = nnx.jit(lambda m, *x: m(*x))
    with torch.no_grad():
        ref = hf(**torch_in).logits.numpy()
    max_diff = float(np.abs(np.asarray(forward(ours, *jax_in)) - ref).max())

    def run_torch() -> None:
        with torch.no_grad():
            hf(**torch_in)

    def run_jax() -> None:
        forward(ours, *jax_in).block_until_ready()

    return {"slim_jax": run_jax, "torch": run_torch}, max_diff, args.batch * args.seq


def generate_fns(args: argparse.Namespace, hf: Any, ours: Any) -> dict[str, Callable[[], object]]:
    """Blocking greedy generation calls of both sides: exactly --new-tokens per row."""
    import torch

    from slim_jax.models.generate import generate  # one generate for every model family

    prompts = np.random.default_rng(1).integers(3, args.vocab, (args.batch, args.prompt))
    torch_prompts = torch.tensor(prompts)
    rows = prompts.tolist()

    def run_torch() -> None:
        with torch.no_grad():
            hf.generate(torch_prompts, attention_mask=torch.ones_like(torch_prompts),
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        do_sample=False, pad_token_id=0)

    def run_jax() -> None:
        generate(ours, rows, max_new_tokens=args.new_tokens, stop_ids=())

    return {"slim_jax": run_jax, "torch": run_torch}


def llama2c_generation(args: argparse.Namespace) -> str | None:
    """Generation speed of the real llama2.c model (slim_jax only), if the data folder has it."""
    from slim_jax.errors import DataError
    from slim_jax.models.generate import generate
    from slim_jax.models.llama2c import load_llama2c
    from slim_jax.settings import data_dir

    try:
        folder = data_dir(args.data_dir, required="tinystories260k") / "tinystories260k"
    except DataError:
        return None
    model, tok = load_llama2c(folder / "checkpoint_v1.bin")

    def run() -> None:
        generate(model, [""] * args.batch, tokenizer=tok, max_new_tokens=256, stop_ids=())

    times = harness.interleave({"tinystories260k": run}, repeats=3)["tinystories260k"]
    return harness.describe(times, work=args.batch * 256, unit="tok/s")


def generation_bound(ours: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The memory roof of greedy decoding: every new token reads all the weights once (a batch
    of a few rows cannot reuse them from cache when they are larger than it), so one decoding
    step takes at least `weight bytes / read bandwidth` on either side, whatever the library."""
    import jax
    from flax import nnx

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    bandwidth = harness.read_bandwidth()
    tok_s = args.batch * bandwidth / weight_bytes
    line = (f"generation memory roof: {weight_bytes / 2**20:.1f} MiB of weights read per step at "
            f"{bandwidth / 2**30:.2f} GiB/s measured read bandwidth: at most {tok_s:,.0f} tok/s "
            f"(batch {args.batch}) for any implementation in float32")
    return {"weight_bytes": weight_bytes, "read_bytes_per_s": bandwidth, "max_tok_s": tok_s,
            "line": line}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    ctx = harness.start(args, __file__, argv)  # before JAX's first computation: pins threads
    import jax
    import torch

    harness.torch_threads(ctx.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_and_ours(args, Path(tmp))
    fwd, max_diff, tokens = forward_fns(args, hf, ours)
    forward_times = harness.interleave(fwd, repeats=args.repeats)
    generate_times = harness.interleave(generate_fns(args, hf, ours),
                                        repeats=max(1, args.repeats // 3))
    rows = [harness.compare(f"{args.model} forward tok/s", forward_times, "slim_jax", "torch",
                            work=tokens),
            harness.compare(f"{args.model} greedy generation tok/s", generate_times, "slim_jax",
                            "torch", work=args.batch * args.new_tokens)]
    print(f"# config: {args.model}, vocab {args.vocab}, hidden {args.hidden}, {args.layers} "
          f"layers, {args.heads} heads, batch {args.batch} x seq {args.seq}"
          + (f" (decoder {args.dec_seq})" if args.model == "t5" else "")
          + f"; generation {args.prompt}-token prompts, {args.new_tokens} new tokens; "
          f"max |logit diff| {max_diff:.2e}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(ctx.table(rows))
    extra = llama2c_generation(args) if args.model == "llama" else None
    if extra:
        print(f"tinystories260k generation (slim_jax, batch {args.batch} x 256 new): {extra}")
    bound = generation_bound(ours, args)
    print(bound["line"])
    for row in rows:
        print(row.line())
    for row, target in zip(rows, (1.0, 1.5), strict=True):  # issue 14's targets
        print(f"TARGET {row.measure}: slim_jax >= {target:g}x torch ({ctx.threads} threads): "
              f"{row.speedup:.2f}x ({'met' if row.speedup >= target else 'MISSED'})")
    result = {"context": ctx.record(), "config": vars(args), "max_abs_logit_diff": max_diff,
              "forward_s": forward_times, "generate_s": generate_times,
              "tinystories260k_generate": extra, "generation_bound": bound}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
