"""Compile-only runs: the real programs, compiled for a named topology, measured per chip.

Before renting a pod, `--compile-only --topology v5e-16` builds the full-size model from its
architecture alone (`nnx.eval_shape`: shapes, no weights, no memory), lowers the program a run
would execute (`slim_jax.train.step.compile_train_step`'s training step; LoRAHub's population
scoring and greedy generation) with the run's shardings over the topology's devices
(`slim_jax.parallel.topology`), and compiles it with XLA for that chip. The compiled program says
what one chip needs:

    total = arguments + outputs - donated (aliased) outputs + temporaries        (per chip)

(`memory_analysis()`), split here by kind from the shardings: frozen parameters, trained
adapters, optimiser state, other state, the batch, and temporaries (activations and what the
backward pass keeps); and its FLOPs per chip (`cost_analysis()`, with each loop's body counted
as many times as the loop runs: `slim_jax.train.loop_flops`; XLA's own figure counts a scanned
layer stack's body once). At the chip's peak FLOP/s the step would take `flops / peak`, so
`MFU <= model_flops / compiled_flops`: the upper bound a run could reach (rematerialisation
lowers it: recomputed forward passes are FLOPs that do no model work).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slim_jax.errors import ConfigError
from slim_jax.models.registry import config_from_hf, family_for_config
from slim_jax.nn import adapter_l1
from slim_jax.parallel.mesh import make_mesh
from slim_jax.parallel.sharding import (
    batch_axes,
    check_global_batch,
    mesh_context,
    tree_shardings,
)
from slim_jax.parallel.topology import GIB, Topology, topology
from slim_jax.train.loop_flops import FlopsCount, loop_flops
from slim_jax.train.metrics import count_params, training_flops_per_token
from slim_jax.train.optimizer import make_optimizer
from slim_jax.train.state import TrainState, cast_floating, resolve_frozen_dtype, split_model
from slim_jax.train.step import StepDefinition
from slim_jax.train.step import compile_train_step as jit_step

# Hugging Face config.json contents of the full-size architectures the presets name.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Llama-3-8B (and its fine-tunes, such as the pod presets' OpenChat-3.6-8B).
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rope_theta": 500000.0, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128009},
    "llama-3.2-1b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "tie_word_embeddings": True, "bos_token_id": 128000,
                     "eos_token_id": 128001},
    "flan-t5-large": {"model_type": "t5", "vocab_size": 32128, "d_model": 1024, "d_kv": 64,
                      "d_ff": 2816, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 16,
                      "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


def architecture(name_or_path: str) -> dict[str, Any]:
    """The `config.json` contents of a built-in architecture name or of a model folder / file.

    Paths go through `etils.epath`, so `gs://bucket/model` works as a local folder does.

    Raises:
      ConfigError: neither a built-in name nor a readable `config.json`.

    >>> architecture("llama-3-8b")["hidden_size"]
    4096
    """
    if name_or_path in ARCHITECTURES:
        return dict(ARCHITECTURES[name_or_path])
    path = epath.Path(name_or_path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"architecture {name_or_path!r} is neither built in "
                          f"({', '.join(ARCHITECTURES)}) nor a model folder with a config.json")
    return json.loads(file.read_text())


def model_factory(
    config: Mapping[str, Any], *, dtype: Any = jnp.bfloat16, param_dtype: Any = jnp.bfloat16,
    overrides: Mapping[str, Any] | None = None,
) -> Callable[[], nnx.Module]:
    """A function building the model of a `config.json` dict (call it under `nnx.eval_shape`).

    Args:
      config: a Hugging Face config (`architecture`).
      dtype, param_dtype: compute and parameter dtypes.
      overrides: fields of the family's config to set (e.g. `remat`, `scan_layers`).

    Raises:
      ConfigError: a model_type slim_jax does not implement, or an override its config lacks.
    """
    cfg = config_from_hf(config, source="architecture", dtype=dtype, param_dtype=param_dtype)
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"{type(cfg).__name__} has no field {unknown[0]!r}: this model family "
                          "does not take that setting")
    cfg = dataclasses.replace(cfg, **(overrides or {}))
    family = family_for_config(cfg)
    return lambda: family(cfg, rngs=nnx.Rngs(0))


def bytes_per_chip(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of the (abstract) `tree` laid out as `shardings` (same structure)."""
    leaves, placed = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    if len(leaves) != len(placed):
        raise ConfigError(f"{len(leaves)} arrays but {len(placed)} shardings")
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize  # (PRNG keys have one too)
               for x, s in zip(leaves, placed, strict=True))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What one compiled program needs per chip.

    Attributes:
      program: what was compiled (`train step`, `population P=16`, ...).
      topology: where.
      mesh: the mesh axis sizes.
      held: bytes per chip of each kind of input (`frozen`, `adapters`, `optimizer`, ...).
      temp_bytes: temporaries per chip (activations, what the backward pass keeps).
      total_bytes: arguments + outputs - aliased + temporaries + code, per chip.
      flops: FLOPs per chip of one call, each loop's body counted as many times as it runs.
      model_flops: useful FLOPs per chip (the model's arithmetic), for the MFU bound; None if
        not estimated.
      compile_s: seconds to lower and compile (on this host).
      flops_count: "exact"; "at most" when a loop may stop on data before its trip count
        (greedy decoding once every row has ended): `flops` and `model_flops` are then those of
        a call that runs it to the end; "at least" when the program does not state a loop's
        trip count: that body is counted once, `flops` is a lower bound and no MFU bound is
        given (`slim_jax.train.loop_flops`).
      xla_flops: XLA's own figure (`cost_analysis()`: each loop body counted once).
    """

    program: str
    topology: Topology
    mesh: Mapping[str, int]
    held: Mapping[str, int]
    temp_bytes: int
    total_bytes: int
    flops: float
    model_flops: float | None
    compile_s: float
    flops_count: FlopsCount = "exact"
    xla_flops: float | None = None

    @property
    def flops_exact(self) -> bool:
        """`flops` is what every call does."""
        return self.flops_count == "exact"

    @property
    def fits(self) -> bool:
        """Whether the program fits in one chip's memory."""
        return self.total_bytes <= self.topology.hbm_bytes

    @property
    def step_s_at_peak(self) -> float | None:
        """Seconds per call if the chip ran its FLOPs at peak rate (a lower bound)."""
        peak = self.topology.peak_flops
        return None if peak is None or math.isnan(self.flops) else self.flops / peak

    @property
    def mfu_bound(self) -> float | None:
        """`model_flops / flops`: the MFU a call could reach at best."""
        if self.model_flops is None or not self.flops or self.flops_count == "at least":
            return None
        return self.model_flops / self.flops

    def lines(self) -> list[str]:
        """A human-readable summary, one item a line."""
        t = self.topology
        gib = lambda b: f"{b / GIB:.2f} GiB"
        held = ", ".join(f"{k} {gib(v)}" for k, v in self.held.items())
        flops = f"  FLOPs per chip {self.flops:.3e}"
        if self.flops_count == "at least":
            flops += " (a data-dependent loop counted once: a lower bound)"
        elif self.flops_count == "at most":
            flops += " (loops that may stop on data run to the end: the most a call does)"
        elif self.xla_flops is not None and self.xla_flops != self.flops:
            flops += f" (loops as run; XLA's count, loop bodies once: {self.xla_flops:.3e})"
        out = [f"{self.program} on {t.name} ({len(t.devices)} x {t.device_kind}, "
               f"{t.hbm_bytes / GIB:.1f} GiB each), mesh {dict(self.mesh)}",
               f"  per chip: {held}, temporaries {gib(self.temp_bytes)}; total "
               f"{gib(self.total_bytes)} of {gib(t.hbm_bytes)} "
               f"({'fits' if self.fits else 'DOES NOT FIT'})",
               flops if not math.isnan(self.flops)
               else "  not compiled: XLA found it needs more memory than the chip has"]
        if self.step_s_at_peak is not None:
            out[-1] += f"; at peak {t.peak_flops / 1e12:.0f} TFLOP/s: {self.step_s_at_peak:.3f} s"
        if self.mfu_bound is not None:
            out[-1] += f"; MFU <= {self.mfu_bound:.2f}"
        out.append(f"  compile {self.compile_s:.1f} s")
        return out


def compile_program(
    program: str, fn: Callable[..., Any], args: Sequence[Any], shardings: Sequence[Any],
    topo: Topology, mesh: Mesh, *, kinds: Mapping[str, int], donate: tuple[int, ...] = (),
    model_flops: float | None = None,
) -> CompileReport:
    """Lower and compile `fn(*args)` (abstract args, placed by `shardings`) for `topo`; measure it.

    Args:
      program: a name for the report.
      fn: the function (not yet jitted) or an already jitted one (then `shardings` is only used
        for the byte counts, and must match the jit's own).
      args: abstract arguments (`jax.ShapeDtypeStruct` trees).
      shardings: one tree of `NamedSharding`s per argument.
      topo, mesh: where.
      kinds: bytes per chip by kind, reported as they are.
      donate: indices of donated arguments (when `fn` is not jitted yet).
      model_flops: useful FLOPs per chip, for the MFU bound (of a call that runs every loop
        to the end, when a loop may stop earlier on data).
    """
    start = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(
        fn, in_shardings=tuple(shardings), donate_argnums=donate)
    with mesh_context(mesh):
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as err:
            if "should include all slice devices" in str(err):
                # Some slices (v5e-64, v5e-256: limited ICI routing; not v5e-16) take a
                # multi-chip program only over the whole slice.
                raise ConfigError(
                    f"{program}: XLA compiles multi-chip programs for {topo.name} only over all "
                    f"{len(topo.devices)} chips (limited ICI routing); this one spans "
                    f"{mesh.size}") from None
            # XLA refuses a program whose working set exceeds the chip's HBM; report what it
            # said it needs instead of the program.
            needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])", str(err))
            if "RESOURCE_EXHAUSTED" not in str(err) or needed is None:
                raise
            temp = int(float(needed.group(1)) * 1024 ** "KMGT".index(needed.group(2)) * 1024)
            return CompileReport(program, topo, dict(mesh.shape), dict(kinds), temp,
                                 temp + sum(kinds.values()), float("nan"), None,
                                 time.perf_counter() - start)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    # XLA's cost analysis counts a loop's body once: a program with a while loop (scanned
    # layers, gradient accumulation, decoding) does more; count each body as often as it runs.
    flops = loop_flops(compiled.as_text(), float(cost.get("flops", 0.0)))
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)
    return CompileReport(program, topo, dict(mesh.shape), dict(kinds), memory.temp_size_in_bytes,
                         total, flops.flops, model_flops, seconds, flops.count, flops.reported)


@dataclasses.dataclass(frozen=True)
class TrainStepProgram:
    """The training step of a run, ready to lower: `step.lower(*args)`.

    Attributes:
      step: the jitted step (`slim_jax.train.step.MeshJit`: lowered under the run's mesh and
        rules).
      args: its abstract arguments `(state, frozen, batch)`.
      kinds: bytes per chip of each kind of input.
      model_flops: the model's FLOPs of one step, all devices together.
    """

    step: Any
    args: tuple[Any, ...]
    kinds: Mapping[str, int]
    model_flops: float


def train_step_program(
    model: nnx.Module, mesh: Mesh, config: Any, *, batch_size: int, seq_len: int,
) -> TrainStepProgram:
    """The training step of `model` (abstract, adapters injected) as a `Trainer` runs it.

    Args:
      model: the abstract model with adapters (`nnx.eval_shape` of `model_factory`, then
        `slim_jax.nn.inject` under `nnx.eval_shape`).
      mesh: the run's mesh (`make_mesh(config.mesh, devices)`).
      config: the run's `slim_jax.train.TrainConfig` (mesh, rules, frozen dtype, optimiser,
        gradient accumulation, L1).
      batch_size, seq_len: the global batch.
    """
    rules = config.rules
    # The trainer's own check, so a batch the topology cannot split is one line, not XLA's trace.
    check_global_batch(batch_size, mesh, rules, micro_steps=config.grad_accum_steps)
    view = nnx.view(model, deterministic=False, use_running_average=False,
                    raise_if_not_found=False)
    graphdef, params, frozen, mutable = split_model(view)
    frozen_dtype = resolve_frozen_dtype(config.frozen_dtype, mesh.devices.flat[0].platform)
    frozen = jax.eval_shape(lambda f: cast_floating(f, frozen_dtype), frozen)
    tx = make_optimizer(config.optimizer, config.steps)
    penalty = adapter_l1 if config.l1_coeff > 0 else None
    definition = StepDefinition(graphdef, tx, penalty=penalty, l1_coeff=config.l1_coeff,
                                micro_steps=config.grad_accum_steps)
    opt_state = jax.eval_shape(tx.init, params)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, mutable, opt_state)
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
             for key in ("tokens", "positions", "segment_ids", "targets")}
    batch["target_mask"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)
    step = jit_step(definition, state, frozen, mesh, rules)
    on = lambda tree: bytes_per_chip(tree, tree_shardings(tree, mesh, rules))
    batch_on = NamedSharding(mesh, PartitionSpec(batch_axes(rules)))
    kinds = {"frozen": on(frozen), "adapters": on(params), "optimizer": on(opt_state),
             "state": on(mutable),
             "batch": bytes_per_chip(batch, {k: batch_on for k in batch})}
    tokens = batch_size * seq_len
    useful = training_flops_per_token(count_params(frozen), count_params(params)) * tokens
    return TrainStepProgram(step, (state, frozen, batch), kinds, useful)


def compile_train_step(
    model: nnx.Module, topo: Topology, config: Any, *, batch_size: int, seq_len: int,
) -> CompileReport:
    """The training step of `model` as a `Trainer` runs it (`train_step_program`), compiled for
    `topo` over the run's mesh (`config.mesh`) and measured."""
    mesh = make_mesh(config.mesh, topo.devices)
    program = train_step_program(model, mesh, config, batch_size=batch_size, seq_len=seq_len)
    return compile_program("train step", program.step, program.args, (), topo, mesh,
                           kinds=program.kinds, model_flops=program.model_flops / mesh.size)


def summary(reports: Sequence[CompileReport]) -> tuple[int, str]:
    """`(exit code, last line)` over the reports: 0 and `fits: X.X of Y.Y GiB per chip` when all
    fit (X the largest), else 1 and `does not fit: ...` naming the programs that do not."""
    if not reports:
        raise ConfigError("no program was compiled")
    worst = max(reports, key=lambda r: r.total_bytes / r.topology.hbm_bytes)
    hbm = worst.topology.hbm_bytes / GIB
    failing = [r for r in reports if not r.fits]
    if not failing:
        return 0, f"fits: {worst.total_bytes / GIB:.1f} of {hbm:.1f} GiB per chip"
    named = "; ".join(f"{r.program} needs {r.total_bytes / GIB:.1f} GiB" for r in failing)
    return 1, f"does not fit: {named}, of {hbm:.1f} GiB per chip on {worst.topology.name}"


def report(reports: Iterable[CompileReport], print_fn: Callable[[str], None] = print) -> int:
    """Print every report as it comes (`reports` may be a generator compiling them one by one)
    and the summary line last; returns the exit code (0: fits)."""
    done = []
    for r in reports:
        for line in r.lines():
            print_fn(line)
        done.append(r)
    code, last = summary(done)
    print_fn(last)
    return code


__all__ = [
    "ARCHITECTURES",
    "CompileReport",
    "TrainStepProgram",
    "architecture",
    "bytes_per_chip",
    "compile_program",
    "compile_train_step",
    "model_factory",
    "report",
    "summary",
    "topology",
    "train_step_program",
]
