"""Training-step time: SLIM vs plain LoRA vs the frozen forward+backward alone (slim_jax), and a
PyTorch peft LoRA step of the same model, measured side by side in one run.

    python benchmarks/train_step.py                       # d_model 1024, 4 layers, seq 512
    python benchmarks/train_step.py --threads 1           # the one-core case (both sides)
    python benchmarks/train_step.py --layers 8            # the deeper model of earlier tables
    python benchmarks/train_step.py --layers 2 --steps 3  # a quicker look

Variants (every adapted model adapts all seven projections q k v o gate up down):
  slim    SLIM, 8 LoRA experts of rank 16 + 2 identity experts, top-2, yielding with 8 clusters,
          SLIM L1 penalty; a full optimiser step (`Trainer.train_step`).
  lora    plain LoRA of rank 16 (alpha 32); a full optimiser step.
  frozen  forward + backward through the frozen model alone (gradient to the activations, no
          adapter): the floor under any adapter step.
  torch   transformers' LlamaForCausalLM with peft LoRA r16 on the same modules, AdamW step.
All fp32, random weights, one batch of random tokens. benchmarks/harness.py refuses a busy machine
(see --allow-busy), pins both sides to the same cores and threads (`--threads N`: the first N
cores, XLA's pool and torch's threads alike), warms every variant up (compilation), then runs
the timed steps round robin (one step of each variant per round, rotating which goes first).
Reported: median [inter-quartile range] seconds per step, and the ratios as medians of the
per-round ratios (min-max). About 2 to 3 minutes at the defaults on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness  # benchmarks/harness.py, beside this file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATTERN = "(" + "|".join(TARGETS) + ")$"
VARIANTS = ("frozen", "lora", "slim", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816, help="SwiGLU hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of frozen,lora,slim,torch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    harness.add_arguments(p, repeats=5)
    p.add_argument("--steps", dest="repeats", type=int, help="the same as --repeats")
    return p.parse_args(argv)


def batch(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    tokens = rng.integers(0, args.vocab, shape, dtype=np.int32)
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "targets": np.roll(tokens, -1, axis=1),
        "target_mask": np.ones(shape, np.float32),
    }


def jax_variant(name: str, args: argparse.Namespace) -> Callable[[], object]:
    """A blocking step function of the slim_jax variant `name`."""
    import jax
    from flax import nnx

    from slim_jax.models.llama import Llama, LlamaConfig
    from slim_jax.nn import LoRAConfig, SlimConfig, inject
    from slim_jax.parallel import MeshConfig
    from slim_jax.train import OptimizerConfig, TrainConfig, Trainer, target_cross_entropy

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                         intermediate_size=args.ffn, num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, max_position_embeddings=args.seq)
    model = Llama(config, rngs=nnx.Rngs(0))
    data = batch(args)
    if name == "frozen":
        graphdef, embedding, rest = nnx.split(model, lambda path, _: "embed_tokens" in path, ...)

        @jax.jit
        def forward_backward(embedding, rest, data):
            def loss(embedding):
                logits = nnx.merge(graphdef, embedding, rest).batch_logits(data)
                return target_cross_entropy(logits, data["targets"], data["target_mask"])

            return jax.value_and_grad(loss)(embedding)

        device_data = jax.device_put(data)
        return lambda: jax.block_until_ready(forward_backward(embedding, rest, device_data))

    if name == "slim":
        adapter = SlimConfig(num_lora_experts=8, num_identity_experts=2, top_k=2, rank=args.rank,
                             alpha=2 * args.rank, num_clusters=8)
        l1 = 1e-4
    else:
        adapter, l1 = LoRAConfig(rank=args.rank, alpha=2 * args.rank), 0.0
    inject(model, PATTERN, adapter, rngs=nnx.Rngs(1))
    trainer = Trainer(model, TrainConfig(steps=10_000, l1_coeff=l1, mesh=MeshConfig(data=-1),
                                         progress=False, frozen_dtype="keep",
                                         optimizer=OptimizerConfig(warmup_steps=0)))
    return lambda: jax.block_until_ready(trainer.train_step(data)["loss"])


def torch_variant(args: argparse.Namespace) -> Callable[[], object]:
    """A step of transformers' Llama with peft LoRA: forward, backward, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # threads: set by harness.torch_threads, the same as XLA's
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.seq)
    config._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      target_modules=list(TARGETS)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens = torch.from_numpy(batch(args)["tokens"].astype(np.int64))

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    ctx = harness.start(args, __file__, argv)  # before JAX's first computation: pins threads
    import jax
    import torch

    harness.torch_threads(ctx.threads)
    tokens = args.batch * args.seq
    print(f"# d_model {args.d_model}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, rank {args.rank}; jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    steps = {name: torch_variant(args) if name == "torch" else jax_variant(name, args)
             for name in variants}
    times = harness.interleave(steps, repeats=args.repeats, warmup=args.warmup)
    rows = []
    if "lora" in times:
        rows += [harness.compare(f"{name} step s", times, "lora", name)
                 for name in variants if name != "lora"]
    print("| variant | seconds per step: median [IQR] | tokens/s (median) |\n|---|---|---|")
    for name in variants:
        print(f"| {name} | {harness.describe(times[name])} | "
              f"{tokens / harness.Stats.of(times[name]).median:,.0f} |")
    if rows:
        print("Speed of slim_jax LoRA against each other variant:")
        print(ctx.table(rows))
        for row in rows:
            print(row.line())
    by_name = {r.b: r for r in rows}
    if "slim" in by_name:
        slim = by_name["slim"].speedup  # t_slim / t_lora per round
        print(f"TARGET SLIM step <= 1.3x LoRA step: {slim:.2f}x "
              f"({'met' if slim <= 1.3 else 'MISSED'})")
    if "torch" in by_name:
        faster = by_name["torch"].speedup
        print(f"TARGET slim_jax LoRA step faster than torch peft ({ctx.threads} threads): "
              f"{faster:.2f}x ({'met' if faster >= 1 else 'MISSED'})")
    results = {"context": ctx.record(), "args": vars(args) | {"json": str(args.json)},
               "times_s": times}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
