"""Where the CPU time of the Llama forward and of the LoRA train step goes, by kind of operation.

The program is compiled, run --repeats times under `jax.profiler` and the trace read back
(`jax.profiler.ProfileData`): every executed XLA instruction's time, summed over all threads, is
charged to a category found from the instruction's source location in the compiled HLO (the
innermost frame of slim_jax or flax code that made it, and the text of that line):
  attention einsum, mask apply (`where(mask, ...)`), softmax, mask construction, RoPE (tables and
  rotation), norms, linear (the projections' matmuls), LoRA (the adapters' extra matmuls),
  MLP activation, embedding, head + loss, layout (bare transposes / copies XLA inserted), other.
Relative shares are much less sensitive to machine load than absolute times (though not immune:
a busy machine slows memory-bound operations more than matmuls). The category rules read
slim_jax/models/llama.py's, layers.py's and attention_blocks.py's current source lines; see
`CATEGORIES`.

    python benchmarks/profile_cpu.py                          # forward: model_forward's default
    python benchmarks/profile_cpu.py --target train           # LoRA forward+backward, rank 16
    python benchmarks/profile_cpu.py --target train --hidden 1024 --ffn 2816 --heads 16 \\
        --kv-heads 16 --vocab 32000 --seq 512 --batch 1 --layers 2   # train_step.py's shapes
    nice -n 10 python benchmarks/profile_cpu.py --allow-busy --top 15

Prints a markdown table of the categories (share of the profiled time and milliseconds per
call) and the --top instructions with their category and source line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import linecache
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import harness  # benchmarks/harness.py, beside this file

# (category, file pattern, line pattern): the first rule matching a frame (innermost first) wins.
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    # the model code lives in models/llama.py and the shared models/layers.py
    ("LoRA", r"nn/(lora|lora_linear|slim_linear)\.py", r""),
    ("softmax", r"", r"softmax"),
    ("softmax", r"models/attention_blocks\.py", r"exp\(|total|delta|p = e"),
    ("mask apply", r"", r"where\((block_)?mask"),
    ("attention einsum", r"models/(llama|layers|attention_blocks)\.py", r"einsum"),
    ("RoPE", r"models/(llama|layers)\.py", r"rope|angles|cos|sin"),
    ("mask construction", r"models/(llama|layers)\.py", r"mask =|key_slots|query_slots|segment"),
    ("norms", r"models/(llama|layers)\.py", r"rsqrt|normed|norm\("),
    ("MLP activation", r"models/(llama|layers)\.py", r"silu"),
    ("head + loss", r"", r"cross_entropy|log_softmax|lm_head|attend\(|logits"),
    ("embedding", r"", r"embed"),
    ("linear", r"flax/nnx/nn/linear\.py", r""),
    ("linear", r"models/(llama|layers)\.py", r"_proj\("),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("forward", "train"), default="forward")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=None, help="SwiGLU size [hidden * 8 // 3]")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (--target train)")
    p.add_argument("--dtype", default="float32", help="compute dtype [float32]; e.g. bfloat16")
    p.add_argument("--top", type=int, default=10, help="instructions listed [10]")
    harness.add_arguments(p, repeats=5)
    return p.parse_args(argv)


def program(args: argparse.Namespace) -> tuple[Callable, tuple]:
    """The jitted function to profile and its arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from slim_jax.models.llama import Llama, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.ffn or args.hidden * 8 // 3,
                         num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 16), dtype=args.dtype)
    model = Llama(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.seq)))
    if args.target == "forward":
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), (state, tokens)
    import optax

    from slim_jax.nn import LoRAConfig, inject

    inject(model, r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
           LoRAConfig(rank=args.rank, alpha=2 * args.rank), rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora, rest, tokens):
        logits = nnx.merge(graphdef, lora, rest)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss)), (lora, rest, tokens)


def hlo_categories(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (category, source 'file:line: text') from compiled HLO text.

    A fusion takes the category of the costliest-looking instruction inside it: a dot, else its
    root; bare transposes and copies are 'layout'.
    """
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}}
    locations: dict[int, tuple[int, int]] = {}
    frames: dict[int, tuple[int, int]] = {}
    section = None
    for line in hlo.splitlines():
        stripped = line.strip()
        if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = stripped
            continue
        if not stripped or stripped.startswith(("%", "ROOT", "ENTRY", "HloModule", "}")):
            section = None if stripped.startswith(("%", "ENTRY", "HloModule")) else section
        if section in tables and (m := re.match(r'(\d+) "(.*)"', stripped)):
            tables[section][int(m.group(1))] = m.group(2)
        elif section == "FileLocations" and (m := re.match(
                r"(\d+) \{file_name_id=(\d+) .*?line=(\d+)", stripped)):
            locations[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
        elif section == "StackFrames" and (m := re.match(
                r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", stripped)):
            # The printed parent is one above the parent frame's id (0: none), in jaxlib 0.10.
            frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)) - 1)

    def classify(frame_id: int | None) -> tuple[str, str]:
        seen = set()
        first = ""
        while frame_id is not None and frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            file_id, lineno = locations.get(loc, (0, 0))
            path = tables["FileNames"].get(file_id, "")
            text = linecache.getline(path, lineno).strip()
            where = f"{Path(path).name}:{lineno}: {text}"
            first = first or where
            for category, file_re, line_re in CATEGORIES:
                if re.search(file_re, path) and re.search(line_re, text):
                    if category == "linear" and _is_head(frame_id):
                        return "head + loss", where
                    return category, where
            frame_id = parent or None
        return "other", first

    def _is_head(frame_id: int) -> bool:
        """Whether a flax matmul is called from the model's output head (its own category)."""
        while frame_id in frames:
            loc, parent = frames[frame_id]
            file_id, lineno = locations.get(loc, (0, 0))
            path = tables["FileNames"].get(file_id, "")
            if "slim_jax" in path:
                return bool(re.search(r"lm_head|attend\(", linecache.getline(path, lineno)))
            frame_id = parent
        return False

    computations: dict[str, list[tuple[str, str, int | None]]] = {}
    current = None
    instructions: dict[str, tuple[str, str | None, int | None]] = {}
    for line in hlo.splitlines():
        if m := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
            current = m.group(1)
            computations[current] = []
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z\-]+)\(", line)
        if not m or current is None:
            continue
        name, opcode = m.group(1), m.group(2)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        frame_id = int(frame.group(1)) if frame else None
        computations[current].append((opcode, name, frame_id))
        instructions[name] = (opcode, calls.group(1) if calls else None, frame_id)
    out = {}
    for name, (opcode, called, frame_id) in instructions.items():
        if opcode in ("transpose", "copy"):
            out[name] = ("layout", "")
            continue
        inner = computations.get(called or "", [])
        dots = [f for op, _, f in inner if op in ("dot", "convolution") and f is not None]
        if dots:
            frame_id = dots[0]
        elif inner and all(op in ("transpose", "copy", "parameter", "bitcast")
                           for op, _, _ in inner):
            out[name] = ("layout", "")
            continue
        out[name] = classify(frame_id)
    return out


def profile(fn: Callable, fn_args: tuple, repeats: int) -> dict[str, float]:
    """Nanoseconds per instruction name over `repeats` calls, summed over all threads."""
    import jax
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*fn_args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(repeats):
                jax.block_until_ready(fn(*fn_args))
        data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for event in line.events:
                totals[event.name] += event.duration_ns
    return totals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = harness.start(args, __file__, argv)  # before JAX's first computation: pins threads
    fn, fn_args = program(args)
    categories = hlo_categories(fn.lower(*fn_args).compile().as_text())
    totals = profile(fn, fn_args, args.repeats)
    per_category: dict[str, float] = collections.defaultdict(float)
    charged = {name: ns for name, ns in totals.items() if name in categories}
    for name, ns in charged.items():
        per_category[categories[name][0]] += ns
    total = sum(charged.values()) or 1.0
    print(f"# {args.target}: Llama vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} / {args.kv_heads} heads, batch {args.batch} x seq {args.seq}, "
          f"{args.dtype}" + (f", LoRA rank {args.rank} on all 7 projections, value_and_grad"
                             if args.target == "train" else ""))
    print(f"# load 1-min before -> after: {ctx.load_text()}; {len(charged)} instructions "
          f"profiled, {total / 1e6 / args.repeats:.1f} ms of thread time per call")
    print("| category | share of thread time | ms per call |\n|---|---|---|")
    for category, ns in sorted(per_category.items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {100 * ns / total:.1f} % | {ns / 1e6 / args.repeats:.2f} |")
    print(f"\ntop {args.top} instructions:\n| instruction | category | share | source |\n"
          "|---|---|---|---|")
    for name, ns in sorted(charged.items(), key=lambda kv: -kv[1])[:args.top]:
        category, where = categories[name]
        print(f"| {name} | {category} | {100 * ns / total:.1f} % | `{where[:90]}` |")


if __name__ == "__main__":
    main()
