"""How fast LoRAHub candidates are scored: the population vmapped against one forward per candidate.

For each model and population size P, the same objective (compatibility loss over the K ADAPT
examples + L1) scores P random weight vectors over N = 20 rank-16 modules on q/v:
  - vmap: `Objective.population`, one jitted forward for all P (what `cmaes_search` runs);
  - sequential: `jax.lax.map` over the P candidates inside one program (`scoring="sequential"`);
  - loop: a Python loop calling the jitted single-candidate objective P times (how the
    reference, and `cobyla_search`, evaluate: one dispatch per candidate).
The modes are timed round robin by benchmarks/harness.py (which refuses a busy machine, see
--allow-busy, and pins threads, see --threads). Reported: candidates scored per second (median
[inter-quartile range] over --repeats rounds, after compilation), the achieved FLOP/s (XLA's cost
analysis of the compiled program / median time) against this machine's measured matmul peak
(`harness.matmul_peak`, float32 2048^3, under the same thread setting), and the compiled
program's memory (XLA's memory analysis: arguments, temp buffers). A population whose program
would not fit in the available memory is skipped with a line saying so.

Models:
  - default: the TinyStories model of the cpu preset (llama2.c stories260K, the data folder's
    `tinystories260k`), K = 5 ADAPT examples of BBH `navigate` (real prompts, ~200-270 tokens);
  - default-short: the same with the ADAPT examples of `boolean_expressions` (~70 tokens);
  - t5-large: a random model of google/flan-t5-large's shapes (24 + 24 blocks, d_model 1024,
    16 heads, d_ff 2816, vocab 32128; 144 adapted linears), K = 2 examples of 16 encoder and 4
    decoder tokens (a quick look at the shapes);
  - t5-large-real: the same model at LoRAHub's real input size (issue 14): K = 5 examples of
    260-340 encoder tokens (rows of 384, as `objective_layout` buckets them) and 3-8 target
    tokens. About 1 TFLOP per candidate: tens of seconds per candidate on 2 CPU cores.
--t5-layers shrinks both T5 stacks for a quick check of the script itself.

    SLIM_JAX_DATA_DIR=../shared/data python benchmarks/lorahub_population.py   # ~6 min idle
    python benchmarks/lorahub_population.py --models t5-large-real             # ~10 min idle
    python benchmarks/lorahub_population.py --models t5-large-real --compile-only --populations 1,16
    python benchmarks/lorahub_population.py --models default --populations 1,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness  # benchmarks/harness.py, beside this file

if TYPE_CHECKING:  # slim_jax.lorahub starts JAX's backend on import: imported after pinning
    from slim_jax.lorahub import LoRAModule, Objective

NUM_MODULES = 20
RANK = 16


def random_modules(model: nnx.Module, suffixes: tuple[str, ...], seed: int = 0
                   ) -> list[LoRAModule]:
    """N rank-16 modules with random factors on the linears whose path ends in a suffix."""
    from slim_jax.lorahub import LoRAModule

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
    from slim_jax.data import load_bbh
    from slim_jax.lorahub import ModuleLibrary, build_objective, objective_layout
    from slim_jax.models.llama2c import load_llama2c
    from slim_jax.settings import data_dir

    folder = data_dir(required="tinystories260k") / "tinystories260k"
    model, tokenizer = load_llama2c(folder / "checkpoint_v1.bin")
    attached = ModuleLibrary.from_modules(
        random_modules(model, ("q_proj", "v_proj"))).attach(model)
    task = load_bbh([task_name])[task_name]
    adapt, _ = task.adapt_split()
    return build_objective(attached, task.as_examples(adapt),
                           objective_layout(model, tokenizer))


def t5_large_objective(real_size: bool, layers: int = 24) -> Objective:
    """A random model of flan-t5-large's shapes (`layers` blocks per stack) + 20 modules on q/v
    of every attention; examples: K = 5 of 260-340 encoder and 3-8 target tokens (`real_size`,
    LoRAHub's input size) or K = 2 of 16 + 4 tokens."""
    from slim_jax.data import ByteTokenizer, EncoderDecoderLayout
    from slim_jax.data.layout import TokenizedExample
    from slim_jax.lorahub import ModuleLibrary, build_objective, objective_layout
    from slim_jax.models.t5 import T5, T5Config

    config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=layers,
                      num_decoder_layers=layers, num_heads=16, feed_forward_proj="gated-gelu")
    model = T5(config, rngs=nnx.Rngs(0))
    attached = ModuleLibrary.from_modules(
        random_modules(model, ("SelfAttention/q", "SelfAttention/v", "EncDecAttention/q",
                               "EncDecAttention/v"))).attach(model)
    rng = np.random.default_rng(0)
    if real_size:
        lengths = [(int(rng.integers(260, 341)), int(rng.integers(3, 9))) for _ in range(5)]
        examples = [TokenizedExample(rng.integers(3, 32000, e).astype(np.int32),
                                     rng.integers(3, 32000, d).astype(np.int32))
                    for e, d in lengths]
        return build_objective(attached, examples, objective_layout(model, ByteTokenizer()))
    examples = [TokenizedExample(rng.integers(3, 32000, 16).astype(np.int32),
                                 rng.integers(3, 32000, 4).astype(np.int32)) for _ in range(2)]
    layout = EncoderDecoderLayout(ByteTokenizer(), enc_lengths=16, dec_lengths=4)
    return build_objective(attached, examples, layout)


OBJECTIVES: dict[str, Callable[[argparse.Namespace], Objective]] = {
    "default": lambda args: default_objective(),
    "default-short": lambda args: default_objective("boolean_expressions"),
    "t5-large": lambda args: t5_large_objective(False, args.t5_layers),
    "t5-large-real": lambda args: t5_large_objective(True, args.t5_layers),
}
MODES = ("vmap", "sequential", "loop")
# Per-model defaults where the general ones (P = 1,16, every mode) would run for too long.
DEFAULT_POPULATIONS = {"t5-large-real": (2,)}
DEFAULT_MODES = {"t5-large-real": ("vmap", "loop")}


def _compiled(objective: Objective, weights: jax.Array, scoring: str) -> Any:
    from slim_jax.lorahub import score_candidates

    return score_candidates.lower(objective, weights, scoring=scoring, mesh=None).compile()


def _memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    parts = {"argument_bytes": stats.argument_size_in_bytes,
             "output_bytes": stats.output_size_in_bytes,
             "temp_bytes": stats.temp_size_in_bytes}
    return {**parts, "total_bytes": sum(parts.values())}


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(objective: Objective, populations: Sequence[int], modes: Sequence[str],
            repeats: int, compile_only: bool = False) -> list[dict[str, Any]]:
    """One record per (P, mode): candidates/s (median and IQR), FLOPs, memory.

    FLOPs are XLA's cost analysis of the compiled program; for `sequential` (a loop inside the
    program, which the analysis counts once) and `loop`, P times the single-candidate program's.
    The modes of one P are timed round robin (`harness.interleave`); `compile_only` records
    the FLOPs and memory without running anything.
    """
    value = jax.jit(lambda o, w: o(w))
    rows = []
    for p in populations:
        weights = jax.random.uniform(jax.random.key(p), (p, objective.num_modules),
                                     minval=-1.5, maxval=1.5)
        single = value.lower(objective, weights[0]).compile()
        single_flops = harness.compiled_flops(single)
        compiled = {m: single if m == "loop" else _compiled(objective, weights, m) for m in modes}
        free = available_bytes()
        too_big = [m for m in modes
                   if free is not None and _memory(compiled[m]).get("total_bytes", 0) > 0.9 * free]
        for m in too_big:
            print(f"# skipped P={p} {m}: its program needs "
                  f"{_memory(compiled[m])['total_bytes'] / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB available", flush=True)
        if compile_only:
            for m in modes:
                flops = (harness.compiled_flops(compiled[m]) if m == "vmap"
                         else None if single_flops is None else single_flops * p)
                rows.append({"P": p, "mode": m, "flops": flops, **_memory(compiled[m])})
                print(json.dumps(rows[-1]), flush=True)
            continue
        fns = {m: (lambda w=weights, c=single: [c(objective, x) for x in w]) if m == "loop"
               else (lambda c=compiled[m], w=weights: c(objective, w))
               for m in modes if m not in too_big}
        times = harness.interleave({m: (lambda f=f: jax.block_until_ready(f()))
                                    for m, f in fns.items()}, repeats=repeats)
        for m, t in times.items():
            flops = (harness.compiled_flops(compiled[m]) if m == "vmap"
                     else None if single_flops is None else single_flops * p)
            median = harness.Stats.of(t).median
            rows.append({"P": p, "mode": m, "seconds": t, "median_s": median,
                         "candidates_per_s": p / median,
                         "candidates_text": harness.describe(t, work=p, unit=""),
                         "flops": flops, "flop_per_s": None if flops is None else flops / median,
                         **_memory(compiled[m])})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "seconds"}), flush=True)
    return rows


def markdown(model: str, rows: list[dict[str, Any]], peak: float, ctx: harness.Context) -> str:
    """The table of one model's records, with speeds relative to the Python loop and lax.map
    (ratios of medians) and the share of the matmul peak."""
    loop = {r["P"]: r["candidates_per_s"] for r in rows if r["mode"] == "loop"}
    seq = {r["P"]: r["candidates_per_s"] for r in rows if r["mode"] == "sequential"}
    lines = [f"**{model}** (matmul peak {peak / 1e9:.1f} GFLOP/s; command `{ctx.command}`, "
             f"{ctx.date}, load 1-min {ctx.load_text()})", "",
             "| P | mode | candidates/s median [IQR] | x loop | x lax.map | GFLOP/s | % of peak "
             "| GFLOP per call | memory MiB (args + temp) |", "|---" * 9 + "|"]
    for r in rows:
        gflops = "-" if r["flop_per_s"] is None else f"{r['flop_per_s'] / 1e9:.2f}"
        share = "-" if r["flop_per_s"] is None else f"{100 * r['flop_per_s'] / peak:.1f}"
        per_call = "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.1f}"
        memory = ("-" if "total_bytes" not in r else
                  f"{r['argument_bytes'] / 2**20:.1f} + {r['temp_bytes'] / 2**20:.1f}")
        ratio = [f"{r['candidates_per_s'] / ref[r['P']]:.2f}" if r["P"] in ref else "-"
                 for ref in (loop, seq)]
        lines.append(f"| {r['P']} | {r['mode']} | {r['candidates_text']} | {ratio[0]} | "
                     f"{ratio[1]} | {gflops} | {share} | {per_call} | {memory} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,default-short,t5-large",
                        help=f"comma-separated, of {', '.join(OBJECTIVES)} "
                             "[default,default-short,t5-large]")
    parser.add_argument("--populations", default=None,
                        help="population sizes [1,16; t5-large-real: 2]")
    parser.add_argument("--modes", default=None,
                        help=f"of {', '.join(MODES)} [all; t5-large-real: vmap,loop]")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile: print each program's FLOPs and memory, time nothing")
    parser.add_argument("--t5-layers", type=int, default=24,
                        help="blocks per T5 stack [24, flan-t5-large]; fewer for a quick check")
    parser.add_argument("--json", default=None, help="also write the records to this file")
    harness.add_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in OBJECTIVES]
    unknown += [m for m in (args.modes or "").split(",") if m and m not in MODES]
    if unknown:
        parser.error(f"unknown model(s) or mode(s) {unknown}; models: {', '.join(OBJECTIVES)}; "
                     f"modes: {', '.join(MODES)}")
    ctx = harness.start(args, __file__, argv)  # before JAX's first computation: pins threads
    records: dict[str, Any] = {"context": ctx.record(), "jax": jax.__version__}
    peak = 0.0
    tables = []
    for name in names:
        populations = ([int(p) for p in args.populations.split(",")] if args.populations
                       else DEFAULT_POPULATIONS.get(name, (1, 16)))
        modes = args.modes.split(",") if args.modes else DEFAULT_MODES.get(name, MODES)
        objective = OBJECTIVES[name](args)
        if args.compile_only:
            records[name] = measure(objective, populations, modes, 0, compile_only=True)
            continue
        peak = max(peak, harness.matmul_peak())
        rows = measure(objective, populations, modes, args.repeats)
        records[name] = rows
        tables.append((name, rows, populations))
    if args.compile_only:
        return 0
    peak = max(peak, harness.matmul_peak())  # the highest seen: the least disturbed
    records["matmul_peak_flop_per_s"] = peak
    for name, rows, populations in tables:
        for r in rows:
            r["peak_share"] = None if r["flop_per_s"] is None else r["flop_per_s"] / peak
        print(markdown(name, rows, peak, ctx), flush=True)
        for p in populations:
            by_mode = {r["mode"]: r for r in rows if r["P"] == p}
            if "vmap" in by_mode and "loop" in by_mode:
                speed = by_mode["vmap"]["candidates_per_s"] / by_mode["loop"]["candidates_per_s"]
                print(f"RATIO {name} P={p}: vmap scores {speed:.2f}x the candidates/s of one "
                      "call per candidate (loop)")
            for m, r in by_mode.items():
                if r["peak_share"] is not None:
                    print(f"PEAK {name} P={p} {m}: {100 * r['peak_share']:.0f}% of the matmul "
                          f"peak ({r['flop_per_s'] / 1e9:.1f} of {peak / 1e9:.1f} GFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
