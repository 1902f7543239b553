"""LoRAHub's module library: N LoRA modules of one shape, checked and stacked for composition.

A `LoRAModule` is one upstream adapter as plain factors, `{layer path: (A [d_in, r], B [r, d_out])}`
plus its rank and alpha; it comes from a PEFT directory (`load_module`, through
`slim_jax.models.peft_io`) or from a slim_jax model's `LoRALinear` layers (`module_from_model`).

A `ModuleLibrary` holds N of them after checking (LORAHUB.md s1) that they share the rank, the
LoRA scale, the adapted layers and every factor's shape, naming the odd module and the layer
otherwise; its factors are stacked with a leading `[N]` axis, which `compose` contracts with the
weights `w [N]` (LORAHUB.md s2). `ModuleLibrary.attach(model)` puts `LoRALinear` layers of that
rank on exactly those layers of a base model and returns the split model with the stacked
factors laid out like the model's own adapter state, so a composed state drops into it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.core.compose import compose, path_str
from slim_jax.errors import ShapeError
from slim_jax.nn import LoRAConfig, LoRALinear, adapted_layers, inject, split_adapters
from slim_jax.nn.stack import per_layer_view, stack_leaves

Factors = Mapping[str, tuple[np.ndarray, np.ndarray]]


class LibraryError(ShapeError):
    """LoRA modules that cannot be composed: different ranks, scales, layers or shapes."""


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One LoRA adapter as plain factors.

    Attributes:
      name: the module's name (a LoRAHub id such as `lorahub/flan_t5_large-wiqa`, a task name).
      rank: r.
      alpha: LoRA alpha; the adapter computes `x W + scale * (x A) B`, `scale = alpha / r`
        (`alpha / sqrt(r)` with `rslora`).
      factors: `{layer path: (A [d_in, r], B [r, d_out])}`, e.g. path `layers/0/self_attn/q_proj`.
      rslora: rank-stabilised scaling.

    >>> m = LoRAModule("toy", 2, 4.0, {"q": (np.ones((3, 2)), np.zeros((2, 3)))})
    >>> m.scale, m.paths
    (2.0, ('q',))
    """

    name: str
    rank: int
    alpha: float
    factors: Factors
    rslora: bool = False

    @property
    def lora_config(self) -> LoRAConfig:
        """The `LoRAConfig` of layers that hold this module (no dropout: LoRAHub never trains)."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, rslora=self.rslora)

    @property
    def scale(self) -> float:
        """The LoRA scale `alpha / r` (or `alpha / sqrt(r)`)."""
        return self.lora_config.scale

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted layers, sorted."""
        return tuple(sorted(self.factors))


def load_module(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    name: str | None = None,
    base_model_name_or_path: str | None = None,
    allow_pickle: bool = False,
) -> LoRAModule:
    """A PEFT LoRA adapter directory as a `LoRAModule` on `model`'s layer paths.

    Args:
      directory: holds `adapter_config.json` and `adapter_model.safetensors`.
      model: the base `T5` or `Llama` (concrete or abstract); it names layers and fixes shapes.
      name: the module's name; default the directory's name.
      base_model_name_or_path: when given, refuse an adapter recorded for another base model.
      allow_pickle: accept `adapter_model.bin` (a pickle can run code; off by default).

    Raises:
      CheckpointError / ConfigError: from `slim_jax.models.peft_io.load_peft_factors` (missing
        files, unknown targets, wrong shapes, unsupported PEFT options), naming the directory.
    """
    from slim_jax.models.peft_io import load_peft_factors

    config, factors = load_peft_factors(directory, model, allow_pickle=allow_pickle,
                                        base_model_name_or_path=base_model_name_or_path)
    return LoRAModule(name or Path(directory).name, config.rank, config.alpha, factors,
                      rslora=config.use_rslora)


def module_candidates(module_id: str, module_dir: str | os.PathLike[str]) -> list[Path]:
    """Where a module id may sit in a local folder: `<dir>/<id>`, `<dir>/<last part of the id>`,
    `<dir>/<task>` (the id's last part without `flan_t5_large-`, as `train_lora_modules` names
    its modules).

    >>> [p.as_posix() for p in module_candidates("lorahub/flan_t5_large-wiqa", "m")]
    ['m/lorahub/flan_t5_large-wiqa', 'm/flan_t5_large-wiqa', 'm/wiqa']
    """
    root = Path(module_dir)
    last = module_id.rsplit("/", 1)[-1]
    names = dict.fromkeys([module_id, last, last.removeprefix("flan_t5_large-")])
    return [root / n for n in names]


def find_module(module_id: str, module_dir: str | os.PathLike[str] | None = None, *,
                hub: bool = True, allow_pickle: bool = False) -> Path:
    """The local PEFT directory of a module: in `module_dir` (`module_candidates`), else a hub
    snapshot of the id (from the Hugging Face cache when offline).

    Raises:
      CheckpointError: not in `module_dir` and (with `hub`) not reachable on the hub, naming
        the places looked in.
    """
    from slim_jax.errors import CheckpointError
    from slim_jax.hub import resolve_model_dir

    if module_dir is not None:
        for path in module_candidates(module_id, module_dir):
            if (path / "adapter_config.json").is_file():
                return path
    if not hub:
        looked = ", ".join(str(p) for p in module_candidates(module_id, module_dir or "."))
        raise CheckpointError(f"module {module_id!r} is not in {looked}")
    patterns = ("*.json", "*.safetensors", *(("*.bin",) if allow_pickle else ()))
    return resolve_model_dir(module_id, required=("adapter_config.json",),
                             allow_patterns=patterns)


def module_from_model(model: nnx.Module, name: str) -> LoRAModule:
    """The `LoRALinear` adapters of a slim_jax model as a `LoRAModule` (factors copied to host).

    Raises:
      LibraryError: the model has no LoRA layer, holds SLIM layers, or its LoRA layers differ in
        rank, alpha or scaling (naming two that differ).

    >>> layer = LoRALinear(3, 4, LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(0))
    >>> module_from_model(nnx.List([layer]), "toy").factors["0"][0].shape
    (3, 2)
    """
    layers = adapted_layers(per_layer_view(model))  # a scanned model's under per-layer paths
    other = [p for p, layer in layers.items() if not isinstance(layer, LoRALinear)]
    if other:
        raise LibraryError(f"{name}: LoRAHub composes LoRA adapters; layers {other[:5]} are not "
                           "LoRALinear")
    if not layers:
        raise LibraryError(f"{name}: the model has no LoRALinear layer to take a module from")
    settings: dict[tuple[int, float, bool], str] = {}
    for path, layer in layers.items():
        settings.setdefault((layer.config.rank, layer.config.alpha, layer.config.rslora), path)
    if len(settings) > 1:
        shown = "; ".join(f"{p}: (rank, alpha, rslora) = {s}" for s, p in settings.items())
        raise LibraryError(f"{name}: one module has one rank, alpha and scaling, but its LoRA "
                           f"layers differ: {shown}")
    [(rank, alpha, rslora)] = settings
    factors = {path: (np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...]))
               for path, layer in layers.items()}
    return LoRAModule(name, rank, alpha, factors, rslora=rslora)


def check_modules(modules: Sequence[LoRAModule]) -> None:
    """Raise `LibraryError` unless all modules can be composed: module 0 is the reference.

    They must share the rank, the LoRA scale, the adapted layers and, per layer, the factor
    shapes; the error names the odd module, what differs and, for shapes, the layer.

    >>> a = LoRAModule("a", 2, 4.0, {"q": (np.ones((3, 2)), np.ones((2, 3)))})
    >>> b = LoRAModule("b", 4, 8.0, {"q": (np.ones((3, 4)), np.ones((4, 3)))})
    >>> try:
    ...     check_modules([a, b])
    ... except LibraryError as err:
    ...     print(err)
    module 'b' has rank 4, module 'a' has rank 2: all modules must have the same rank
    """
    if not modules:
        raise LibraryError("a LoRAHub library needs at least one module, got none")
    ref = modules[0]
    names = [m.name for m in modules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LibraryError(f"module names must be unique; repeated: {duplicates}")
    for module in modules[1:]:
        who = f"module {module.name!r}"
        if module.rank != ref.rank:
            raise LibraryError(f"{who} has rank {module.rank}, module {ref.name!r} has rank "
                               f"{ref.rank}: all modules must have the same rank")
        if not np.isclose(module.scale, ref.scale):
            raise LibraryError(f"{who} has LoRA scale {module.scale} (alpha {module.alpha}), "
                               f"module {ref.name!r} has {ref.scale} (alpha {ref.alpha}): "
                               "composing factors of different scales is not LoRAHub's sum")
        if module.paths != ref.paths:
            extra = sorted(set(module.paths) - set(ref.paths))[:3]
            missing = sorted(set(ref.paths) - set(module.paths))[:3]
            raise LibraryError(f"{who} adapts other layers than module {ref.name!r} (extra: "
                               f"{extra}, missing: {missing}): all modules must target the "
                               "same layers")
        for path in ref.paths:
            for factor, mine, theirs in zip("AB", module.factors[path], ref.factors[path],
                                            strict=True):
                if np.shape(mine) != np.shape(theirs):
                    raise LibraryError(f"{who} has {factor} of shape {np.shape(mine)} at layer "
                                       f"{path}, module {ref.name!r} has {np.shape(theirs)}")


@dataclasses.dataclass(frozen=True)
class ModuleLibrary:
    """N checked LoRA modules with their factors stacked for composition.

    Attributes:
      names: the N module names, in stacking order (the order of the weights `w [N]`).
      rank, alpha, rslora: shared by every module.
      a: `{layer path: [N, d_in, r]}` stacked A factors.
      b: `{layer path: [N, r, d_out]}` stacked B factors.

    >>> mods = [LoRAModule(n, 1, 1.0, {"q": (np.full((2, 1), v), np.ones((1, 2)))})
    ...         for n, v in (("x", 1.0), ("y", 3.0))]
    >>> lib = ModuleLibrary.from_modules(mods)
    >>> lib.num_modules, lib.a["q"].shape
    (2, (2, 2, 1))
    """

    names: tuple[str, ...]
    rank: int
    alpha: float
    rslora: bool
    a: Mapping[str, jax.Array]
    b: Mapping[str, jax.Array]

    @classmethod
    def from_modules(cls, modules: Sequence[LoRAModule], dtype: str = "float32") -> ModuleLibrary:
        """Check the modules (`check_modules`) and stack their factors in `dtype`."""
        check_modules(modules)
        ref = modules[0]
        a = {p: jnp.stack([jnp.asarray(m.factors[p][0], dtype) for m in modules])
             for p in ref.paths}
        b = {p: jnp.stack([jnp.asarray(m.factors[p][1], dtype) for m in modules])
             for p in ref.paths}
        return cls(tuple(m.name for m in modules), ref.rank, ref.alpha, ref.rslora, a, b)

    @property
    def num_modules(self) -> int:
        """N."""
        return len(self.names)

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted layers, sorted."""
        return tuple(sorted(self.a))

    @property
    def lora_config(self) -> LoRAConfig:
        """The `LoRAConfig` of the layers that hold a composition."""
        return LoRAConfig(rank=self.rank, alpha=self.alpha, rslora=self.rslora)

    def module(self, name: str) -> LoRAModule:
        """One module back out of the library, by name."""
        if name not in self.names:
            raise LibraryError(f"no module {name!r} in the library; modules: {list(self.names)}")
        i = self.names.index(name)
        factors = {p: (np.asarray(self.a[p][i]), np.asarray(self.b[p][i])) for p in self.paths}
        return LoRAModule(name, self.rank, self.alpha, factors, rslora=self.rslora)

    def attach(self, model: nnx.Module) -> AttachedLibrary:
        """Give `model` LoRA layers on this library's layers and split it for composition.

        Plain `nnx.Linear` layers at the library's paths become `LoRALinear` (in place, sharing
        the base kernels; their factors start as zero B, so the model still computes the base
        function); layers already `LoRALinear` of the same rank and scale are reused. The model
        must hold no other adapter.

        Raises:
          LibraryError: a library layer the model lacks, another adapter on the model, or an
            existing LoRA layer of another rank or scale.
        """
        view = per_layer_view(model)  # a scanned model's layers under per-layer paths
        layers = adapted_layers(view)
        foreign = sorted(set(layers) - set(self.paths))
        if foreign:
            raise LibraryError(f"the model already carries adapters on layers the library does "
                               f"not adapt ({foreign[:5]}); attach to a plain base model")
        config = self.lora_config
        for path, layer in layers.items():
            if (not isinstance(layer, LoRALinear) or layer.merged
                    or (layer.config.rank, layer.config.scale) != (config.rank, config.scale)):
                raise LibraryError(f"layer {path} already holds an adapter that is not an "
                                   f"unmerged LoRA of rank {config.rank} and scale "
                                   f"{config.scale}")
        todo = [p for p in self.paths if p not in layers]
        if todo:
            linears = {"/".join(map(str, p)) for p, m in nnx.iter_modules(view)
                       if isinstance(m, nnx.Linear)}
            absent = [p for p in todo if p not in linears]
            if absent:
                raise LibraryError(f"the library adapts layers the model does not have: "
                                   f"{absent[:5]}; was it trained on another architecture?")
            pattern = "^(?:" + "|".join(re.escape(p) for p in todo) + ")$"
            inject(model, pattern, config, rngs=nnx.Rngs(0))
        graphdef, adapters, rest = split_adapters(model)
        return AttachedLibrary(graphdef, rest, self._stacked_state(model, adapters))

    def _stacked_state(self, model: nnx.Module, adapters: nnx.State) -> nnx.State:
        """The stacked factors as a state of the model's adapter structure, leaves `[N, ...]`
        (a scanned model's stacked layers: `[N, layers, ...]`, `slim_jax.nn.stack`)."""
        factors = stack_leaves(model, {
            **{f"{p}/lora_a": a for p, a in self.a.items()},
            **{f"{p}/lora_b": b for p, b in self.b.items()}}, axis=1)

        def stacked(path: tuple, leaf: jax.Array) -> jax.Array:
            return factors[path_str(path)].astype(leaf.dtype)

        return jax.tree_util.tree_map_with_path(stacked, adapters)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttachedLibrary:
    """A base model split for LoRAHub: structure, frozen base, stacked module factors.

    A pytree whose only static part is the graph definition, so it passes into `jax.jit`, and
    every library of the same layers and shapes (another draw of modules) reuses the compiled
    programs. The module names stay with the `ModuleLibrary` (same order as the weights).

    Attributes:
      graphdef: the adapted model's structure (`slim_jax.nn.split_adapters`).
      rest: the frozen base state, shared by every candidate composition.
      stacked: the module factors laid out like the model's adapter state, leaves `[N, ...]`.
    """

    graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})
    rest: nnx.State
    stacked: nnx.State

    @property
    def num_modules(self) -> int:
        """N, the length of the weight vectors."""
        return jax.tree.leaves(self.stacked)[0].shape[0]

    def composed(self, weights: jax.Array) -> nnx.State:
        """The adapter state of `w [N]`: LORAHUB.md s2, `A_hat = sum_i w_i A_i`, `B_hat = ...`."""
        return compose(weights, self.stacked)

    def model(self, weights: jax.Array) -> nnx.Module:
        """The model computing the composition `w [N]` through its unmerged rank-r path.

        The model shares the base's arrays (never copied); use it inside `jax.jit`/`jax.vmap`.
        """
        return nnx.merge(self.graphdef, self.composed(weights), self.rest)

    def merged_model(self, weights: jax.Array) -> nnx.Module:
        """A model with the composition `w [N]` merged into its kernels (`W + scale A_hat B_hat`)
        once, for fast generation; the base state this library holds is left untouched."""
        rest = jax.tree.map(lambda x: x, self.rest)  # fresh Variables: merging writes kernels
        model = nnx.merge(self.graphdef, self.composed(jnp.asarray(weights, jnp.float32)), rest)
        for layer in adapted_layers(model).values():
            layer.merge()
        return model
