"""Training-step time: SLIM vs plain LoRA vs the frozen forward+backward alone (slim_jax), and a
PyTorch peft LoRA step of the same model, measured side by side in one run.

    python benchmarks/train_step.py                       # d_model 1024, 8 layers, seq 512
    python benchmarks/train_step.py --layers 2 --steps 3  # a quicker look

Variants (every adapted model adapts all seven projections q k v o gate up down):
  slim    SLIM, 8 LoRA experts of rank 16 + 2 identity experts, top-2, yielding with 8 clusters,
          SLIM L1 penalty; a full optimiser step (`Trainer.train_step`).
  lora    plain LoRA of rank 16 (alpha 32); a full optimiser step.
  frozen  forward + backward through the frozen model alone (gradient to the activations, no
          adapter): the floor under any adapter step.
  torch   transformers' LlamaForCausalLM with peft LoRA r16 on the same modules, AdamW step.
All fp32, random weights, one batch of random tokens, on the cores this process may use (all, or
those `taskset -c` leaves it; torch gets as many threads). Each variant is compiled / warmed up
first; then the timed steps run round robin (one step of each variant per round, so that a
change in machine load falls on all alike). Reported: the medians of the wall time and of the
process CPU time (robust on a machine shared with other programs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATTERN = "(" + "|".join(TARGETS) + ")$"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=2816, help="SwiGLU hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps (rounds) per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--variants", default="frozen,lora,slim,torch",
                   help="comma-separated subset of frozen,lora,slim,torch")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def time_interleaved(
    steps: dict[str, Callable[[], object]], warmup: int, rounds: int
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """`(wall, cpu)` seconds of each timed call of every step function (each must block until
    done); cpu is this process's CPU time over all its threads, which other programs on a shared
    machine do not inflate.

    Every function is first called `warmup` times (compilation); then the timed calls go round
    robin, one of each per round, so that a change in machine load falls on all variants alike.
    """
    warm = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        warm[name] = time.perf_counter() - start
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times, warm


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

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA sees too (taskset)
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
    unknown = set(variants) - {"frozen", "lora", "slim", "torch"}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from frozen,lora,slim,torch")
    import jax
    import torch

    tokens = args.batch * args.seq
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.platform()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores; "
          f"jax {jax.__version__} "
          f"({jax.devices()[0].device_kind}), torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"# d_model {args.d_model}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, rank {args.rank}")
    steps = {name: torch_variant(args) if name == "torch" else jax_variant(name, args)
             for name in variants}
    times, warm = time_interleaved(steps, args.warmup, args.steps)
    results = {}
    for name in variants:
        wall = [w for w, _ in times[name]]
        cpu = [c for _, c in times[name]]
        median = statistics.median(wall)
        results[name] = {"median_s": median, "min_s": min(wall), "times_s": wall,
                         "median_cpu_s": statistics.median(cpu), "cpu_s": cpu,
                         "warmup_s": warm[name], "tokens_per_s": tokens / median}
        print(f"{name:7s} median {median:8.3f} s  min {min(wall):8.3f} s  "
              f"cpu {statistics.median(cpu):8.3f} s  {tokens / median:9.1f} tok/s  "
              f"(warm-up incl. compile {warm[name]:.1f} s)")
    if "lora" in results:
        base = results["lora"]["median_s"]
        base_cpu = results["lora"]["median_cpu_s"]
        for r in results.values():
            r["vs_lora"] = r["median_s"] / base
            r["cpu_vs_lora"] = r["median_cpu_s"] / base_cpu
        print("wall-time ratios to slim_jax LoRA: " + ", ".join(
            f"{n} {r['vs_lora']:.2f}x" for n, r in results.items()))
        print("cpu-time ratios to slim_jax LoRA:  " + ", ".join(
            f"{n} {r['cpu_vs_lora']:.2f}x" for n, r in results.items()))
    if "slim" in results and "lora" in results:
        print(f"target SLIM <= 1.3x LoRA: {results['slim']['vs_lora']:.2f}x "
              f"({'met' if results['slim']['vs_lora'] <= 1.3 else 'MISSED'})")
    if "torch" in results and "lora" in results:
        faster = results["torch"]["median_s"] / results["lora"]["median_s"]
        print(f"target slim_jax LoRA faster than PyTorch peft: {faster:.2f}x "
              f"({'met' if faster > 1 else 'MISSED'})")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
