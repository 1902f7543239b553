"""How fast LoRAHub candidates are scored: the population vmapped against one forward per candidate.

For each model and population size P, the same objective (compatibility loss over the K ADAPT
examples + L1) scores P random weight vectors over N = 20 rank-16 modules on q/v:
  - vmap: `Objective.population`, one jitted forward for all P (what `cmaes_search` runs);
  - sequential: `jax.lax.map` over the P candidates inside one program (`scoring="sequential"`);
  - loop: a Python loop calling the jitted single-candidate objective P times (how the
    reference, and `cobyla_search`, evaluate: one dispatch per candidate).
Reported: candidates scored per second (best of `--repeats` timed calls after compilation), the
achieved FLOP/s (XLA's cost analysis of the compiled program / time) against this machine's
measured matmul peak, and the compiled program's memory (XLA's memory analysis: arguments, temp
buffers, outputs) per P.

Models:
  - default: the TinyStories model of the cpu preset (llama2.c stories260K, the data folder's
    `tinystories260k`), K = 5 ADAPT examples of BBH `navigate` (real prompts, ~200-270 tokens
    each, rows of 384);
  - default-short: the same with the ADAPT examples of `boolean_expressions` (~70 tokens, rows
    of 96);
  - t5-large: a random model of google/flan-t5-large's shapes (24 + 24 blocks, d_model 1024,
    16 heads, d_ff 2816, vocab 32128; 144 adapted linears), K = 2 examples of 16 encoder and 4
    decoder tokens, so that it runs on a CPU.

    SLIM_JAX_DATA_DIR=../shared/data python benchmarks/lorahub_population.py
    python benchmarks/lorahub_population.py --models default --populations 1,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from slim_jax.data import ByteTokenizer, EncoderDecoderLayout, load_bbh
from slim_jax.data.layout import TokenizedExample
from slim_jax.lorahub import (
    LoRAModule,
    ModuleLibrary,
    Objective,
    build_objective,
    objective_layout,
    score_candidates,
)
from slim_jax.settings import data_dir

NUM_MODULES = 20
RANK = 16


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn` (results blocked on)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine: `2 n^3 / time` of an n x n product
    (the best of `repeats`; the machine may be shared, so `main` measures it before every model
    and keeps the highest)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    return 2 * n**3 / best_time(lambda: dot(a, b), repeats)


def random_modules(model: nnx.Module, suffixes: tuple[str, ...], seed: int = 0
                   ) -> list[LoRAModule]:
    """N rank-16 modules with random factors on the linears whose path ends in a suffix."""
    layers = {"/".join(map(str, p)): (m.in_features, m.out_features)
              for p, m in nnx.iter_modules(model)
              if isinstance(m, nnx.Linear) and "/".join(map(str, p)).endswith(suffixes)}
    rng = np.random.default_rng(seed)
    return [LoRAModule(f"m{i}", RANK, 32.0, {
        path: (0.05 * rng.standard_normal((d_in, RANK), np.float32),
               0.05 * rng.standard_normal((RANK, d_out), np.float32))
        for path, (d_in, d_out) in layers.items()}) for i in range(NUM_MODULES)]


def default_objective(task_name: str = "navigate") -> Objective:
    """TinyStories + 20 modules on q_proj/v_proj + the K=5 ADAPT examples of a BBH task."""
    from slim_jax.models.llama2c import load_llama2c

    folder = data_dir(required="tinystories260k") / "tinystories260k"
    model, tokenizer = load_llama2c(folder / "checkpoint_v1.bin")
    attached = ModuleLibrary.from_modules(
        random_modules(model, ("q_proj", "v_proj"))).attach(model)
    task = load_bbh([task_name])[task_name]
    adapt, _ = task.adapt_split()
    return build_objective(attached, task.as_examples(adapt),
                           objective_layout(model, tokenizer))


def t5_large_objective() -> Objective:
    """A random model of flan-t5-large's shapes + 20 modules on q/v + 2 short examples."""
    from slim_jax.models.t5 import T5, T5Config

    config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                      num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu")
    model = T5(config, rngs=nnx.Rngs(0))
    attached = ModuleLibrary.from_modules(
        random_modules(model, ("SelfAttention/q", "SelfAttention/v", "EncDecAttention/q",
                               "EncDecAttention/v"))).attach(model)
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(rng.integers(3, 32000, 16).astype(np.int32),
                                 rng.integers(3, 32000, 4).astype(np.int32)) for _ in range(2)]
    layout = EncoderDecoderLayout(ByteTokenizer(), enc_lengths=16, dec_lengths=4)
    return build_objective(attached, examples, layout)


OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "default": default_objective,
    "default-short": lambda: default_objective("boolean_expressions"),
    "t5-large": t5_large_objective,
}


def _compiled(objective: Objective, weights: jax.Array, scoring: str) -> Any:
    return score_candidates.lower(objective, weights, scoring=scoring, mesh=None).compile()


def _memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    parts = {"argument_bytes": stats.argument_size_in_bytes,
             "output_bytes": stats.output_size_in_bytes,
             "temp_bytes": stats.temp_size_in_bytes}
    return {**parts, "total_bytes": sum(parts.values())}


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def measure(objective: Objective, populations: Sequence[int], repeats: int, peak: float
            ) -> list[dict[str, Any]]:
    """One record per (P, mode): candidates/s, FLOP/s, share of peak, memory.

    FLOPs are XLA's cost analysis of the compiled program; for `sequential` (a loop inside the
    program, which the analysis counts once) and `loop`, P times the single-candidate program's.
    """
    value = jax.jit(lambda o, w: o(w))
    single_flops: float | None = None
    rows = []
    for p in populations:
        weights = jax.random.uniform(jax.random.key(p), (p, objective.num_modules),
                                     minval=-1.5, maxval=1.5)
        single = value.lower(objective, weights[0]).compile()
        single_flops = _flops(single)
        for mode in ("vmap", "sequential", "loop"):
            if mode == "loop":
                compiled = single
                jax.block_until_ready(value(objective, weights[0]))
                seconds = best_time(lambda w=weights: [value(objective, x) for x in w], repeats)
                flops = None if single_flops is None else single_flops * p
            else:
                compiled = _compiled(objective, weights, mode)
                jax.block_until_ready(compiled(objective, weights))
                seconds = best_time(lambda c=compiled, w=weights: c(objective, w), repeats)
                flops = _flops(compiled) if mode == "vmap" else (
                    None if single_flops is None else single_flops * p)
            rows.append({"P": p, "mode": mode, "seconds": seconds,
                         "candidates_per_s": p / seconds, "flops": flops,
                         "flop_per_s": None if flops is None else flops / seconds,
                         "peak_share": None if flops is None else flops / seconds / peak,
                         **_memory(compiled)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(model: str, rows: list[dict[str, Any]], peak: float) -> str:
    """The table of one model's records, with speedups over the Python loop and lax.map."""
    loop = {r["P"]: r["candidates_per_s"] for r in rows if r["mode"] == "loop"}
    seq = {r["P"]: r["candidates_per_s"] for r in rows if r["mode"] == "sequential"}
    lines = [f"**{model}** (matmul peak {peak / 1e9:.1f} GFLOP/s)", "",
             "| P | mode | candidates/s | x loop | x lax.map | GFLOP/s | % of peak | "
             "memory MiB (args + temp) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gflops = "-" if r["flop_per_s"] is None else f"{r['flop_per_s'] / 1e9:.2f}"
        share = "-" if r["peak_share"] is None else f"{100 * r['peak_share']:.1f}"
        memory = ("-" if "total_bytes" not in r else
                  f"{r['argument_bytes'] / 2**20:.1f} + {r['temp_bytes'] / 2**20:.1f}")
        lines.append(f"| {r['P']} | {r['mode']} | {r['candidates_per_s']:.1f} | "
                     f"{r['candidates_per_s'] / loop[r['P']]:.2f} | "
                     f"{r['candidates_per_s'] / seq[r['P']]:.2f} | {gflops} | {share} | "
                     f"{memory} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="default,default-short,t5-large",
                        help=f"comma-separated, of {', '.join(OBJECTIVES)} [all]")
    parser.add_argument("--populations", default="1,4,16,64", help="population sizes [1,4,16,64]")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls, best kept [3]")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    args = parser.parse_args(argv)
    populations = [int(p) for p in args.populations.split(",")]
    names = args.models.split(",")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "device": str(jax.devices()[0]),
               "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(machine))
    records: dict[str, Any] = {"machine": machine}
    peak = 0.0
    tables = []
    for name in names:
        objective = OBJECTIVES[name]()
        peak = max(peak, matmul_peak())
        rows = measure(objective, populations, args.repeats, peak)
        records[name] = rows
        tables.append((name, rows))
    peak = max(peak, matmul_peak())
    machine["matmul_peak_flop_per_s"] = peak
    for name, rows in tables:  # shares of the highest peak seen
        for r in rows:
            r["peak_share"] = None if r["flop_per_s"] is None else r["flop_per_s"] / peak
        print(markdown(name, rows, peak), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
