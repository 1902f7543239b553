"""PEFT LoRA adapters in and out of slim_jax models (any `slim_jax.models.family.ModelFamily`).

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, target_modules,
...) and `adapter_model.safetensors` with, per adapted layer,
`base_model.model.<module>.lora_A.weight` `[r, d_in]` and `...lora_B.weight` `[d_out, r]`, where
`<module>` is the layer's Hugging Face module name (`encoder.block.0.layer.0.SelfAttention.q`,
`model.layers.0.self_attn.q_proj`). slim_jax's `LoRALinear` holds the same adapter transposed:
`lora_a = lora_A.weight^T` `[d_in, r]`, `lora_b = lora_B.weight^T` `[r, d_out]`, and computes the
same `y = x W + scale * (x A) B` with `scale = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`).

Module names are translated by the family's own Hugging Face mapping (`model.hf_name_to_path`,
`model.path_to_hf_name`, from `llama_hf.py`, `t5_hf.py`), so there is one name mapping per family.

- `read_peft_config(dir)` (`peft_config.py`): the adapter's settings, unsupported options refused
  by name; `same_base_model(recorded, given)`: whether a recorded base names the given model.
- `load_peft_factors(dir, model)`: `(config, {layer path: (A [d_in, r], B [r, d_out])})`, checked
  against the model (LoRAHub stacks these for its composition).
- `load_peft(model, dir)`: inject `LoRALinear` into the targeted layers and set their factors.
- `save_peft(model, dir, base_model_name_or_path=...)`: write the model's LoRA adapters so that
  `peft.PeftModel.from_pretrained` loads them.

>>> import tempfile
>>> from slim_jax.models.t5 import T5, T5Config
>>> from slim_jax.nn import LoRAConfig
>>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_decoder_layers=1,
...                num_heads=2)
>>> model = T5(cfg, rngs=nnx.Rngs(0))
>>> _ = inject(model, "Attention/(q|v)$", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
>>> folder = tempfile.mkdtemp()
>>> save_peft(model, folder, base_model_name_or_path="toy-t5").target_modules
('q', 'v')
>>> config, factors = load_peft_factors(folder, T5(cfg, rngs=nnx.Rngs(0)))
>>> config.rank, factors["encoder/block/0/layer/0/SelfAttention/q"][0].shape
(2, (8, 2))
>>> load_peft(T5(cfg, rngs=nnx.Rngs(0)), folder)[:2]
['decoder/block/0/layer/0/SelfAttention/q', 'decoder/block/0/layer/0/SelfAttention/v']
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.models import hf
from slim_jax.models.family import ModelFamily
from slim_jax.models.peft_config import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PeftLoRAConfig,
    name_matches,
    read_peft_config,
    same_base_model,
)
from slim_jax.nn import LoRALinear, SlimLinear, adapted_layers, inject, module_path
from slim_jax.nn.stack import per_layer_view
from slim_jax.parallel.rules import DEFAULT_RULES, Rules

PICKLE_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

@dataclasses.dataclass(frozen=True)
class _Naming:
    """An architecture's Hugging Face names: parameter name -> (our path, transposed), inverse."""

    to_path: Callable[[str], tuple[str, bool]]
    to_name: Callable[[str], str]
    task_type: str

    def module_path(self, hf_module: str) -> str | None:
        """Our linear layer path of a Hugging Face module name (None: not a linear layer)."""
        path, transposed = self.to_path(hf_module + ".weight")
        return path.removesuffix("/kernel") if transposed and path.endswith("/kernel") else None

    def hf_module(self, path: str) -> str:
        """The Hugging Face module name of our linear layer path."""
        return self.to_name(path + "/kernel").removesuffix(".weight")


def _naming(model: nnx.Module) -> _Naming:
    if not isinstance(model, ModelFamily):
        raise ConfigError(f"PEFT adapters map onto slim_jax model families (which know their "
                          f"Hugging Face module names), not a {type(model).__name__}")
    return _Naming(model.hf_name_to_path, model.path_to_hf_name, model.peft_task_type)


def _check_base(config: PeftLoRAConfig, expected: str | None, source: str) -> None:
    """Refuse an adapter recorded for another base model (`same_base_model`)."""
    recorded = config.base_model_name_or_path
    if expected is None or not recorded:
        return
    if not same_base_model(recorded, expected):
        raise CheckpointError(f"{source} was trained on base model {recorded!r}, not "
                              f"{str(expected)!r}; load it onto its own base model")


def _linear_layers(model: nnx.Module) -> dict[str, nnx.Linear]:
    """Every linear layer (plain or adapted) of the model by per-layer path (a scanned model's
    stacked layers as `layers/i/...`, `slim_jax.nn.stack.per_layer_view`)."""
    view = per_layer_view(model)
    return {module_path(p): m for p, m in nnx.iter_modules(view) if isinstance(m, nnx.Linear)}


def _load_weights(directory: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = directory / PICKLE_WEIGHTS_FILE
        if not pickled.is_file():
            raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {PICKLE_WEIGHTS_FILE})")
        weights = pickled  # hf refuses it, naming the risk, unless allow_pickle
    return hf.load_safetensors(weights, allow_pickle=allow_pickle)


def load_peft_factors(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    base_model_name_or_path: str | None = None,
    allow_pickle: bool = False,
    dtype: Any = np.float32,
) -> tuple[PeftLoRAConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A PEFT adapter's LoRA factors in slim_jax's layout, keyed by the model's layer paths.

    Args:
      directory: the adapter directory.
      model: the base model (a `T5` or `Llama`, concrete or from `nnx.eval_shape`); it names
        the layers and fixes the shapes every factor must have.
      base_model_name_or_path: when given, refuse an adapter recorded for another base model.
      allow_pickle: accept `adapter_model.bin` (a pickle can run code; off by default).
      dtype: the dtype of the returned factors.

    Returns:
      `(config, {path: (A [d_in, r], B [r, d_out])})`, e.g. path
      `"encoder/block/0/layer/0/SelfAttention/q"`, one entry per targeted layer, sorted.

    Raises:
      CheckpointError: a target name that matches no linear layer of the model, weights for a
        layer the model lacks or the config does not target, a targeted layer without weights,
        a factor of the wrong shape (naming the layer and both shapes), another base model.
    """
    directory = Path(directory)
    config = read_peft_config(directory)
    source = str(directory)
    _check_base(config, base_model_name_or_path, source)
    naming = _naming(model)
    linears = _linear_layers(model)
    head = naming.module_path("lm_head")
    names = {naming.hf_module(path): path for path in linears}
    targeted = {name: path for name, path in names.items()
                if config.targets(name, is_output_head=path == head)}
    if isinstance(config.target_modules, tuple):
        unknown = [t for t in config.target_modules
                   if not any(name_matches((t,), name) for name in names)]
        if unknown:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise CheckpointError(f"{source}: target_modules {unknown} match no linear layer of "
                                  f"this {type(model).__name__}; its linear layers are named "
                                  f"{leaves}")
    if not targeted:
        raise CheckpointError(f"{source}: target_modules {config.target_modules!r} match no "
                              f"linear layer of this {type(model).__name__} (e.g. "
                              f"{sorted(names)[:3]})")

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, array in _load_weights(directory, allow_pickle).items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{source}: {key!r} is not a PEFT LoRA weight (expected "
                                  f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        module = match["module"]
        if module not in names:
            raise CheckpointError(f"{source} holds an adapter for layer {module!r}, which this "
                                  f"{type(model).__name__} does not have (is it another "
                                  f"architecture?)")
        if module not in targeted:
            raise CheckpointError(f"{source} holds weights for {module!r}, which its "
                                  f"target_modules {config.target_modules!r} do not select")
        factors.setdefault(module, {})[match["factor"]] = array
    missing = sorted(n for n in targeted if set(factors.get(n, {})) != {"A", "B"})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{source} lacks lora_A/lora_B weights of {len(missing)} targeted "
                              f"layer(s): {shown}")

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    r = config.rank
    for module, pair in factors.items():
        path = targeted[module]
        layer = linears[path]
        want_a, want_b = (r, layer.in_features), (layer.out_features, r)
        if pair["A"].shape != want_a or pair["B"].shape != want_b:
            raise CheckpointError(
                f"{source}: layer {module!r} has lora_A {pair['A'].shape} and lora_B "
                f"{pair['B'].shape}; this model with r={r} needs {want_a} and {want_b}")
        out[path] = (np.asarray(pair["A"], dtype).T, np.asarray(pair["B"], dtype).T)
    return config, dict(sorted(out.items()))


def load_peft(
    model: nnx.Module,
    directory: str | os.PathLike[str],
    *,
    rngs: nnx.Rngs | None = None,
    base_model_name_or_path: str | None = None,
    allow_pickle: bool = False,
    param_dtype: Any = "float32",
    dropout: float = 0.0,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> list[str]:
    """Put a PEFT LoRA adapter onto `model`, in place: `LoRALinear` on every targeted layer.

    Plain `nnx.Linear` targets are replaced through `slim_jax.nn.inject`; targets that already
    are `LoRALinear` with the same rank, alpha and scaling get their factors overwritten. Layers
    the adapter does not target are left as they are. A scanned model (`scan_layers`) takes the
    same per-layer adapter, stacked (every stacked layer must be targeted).

    Args:
      model: a `T5` or `Llama`.
      directory: the PEFT adapter directory.
      rngs: for the injected layers' initialisation (overwritten) and dropout; default seed 0.
      base_model_name_or_path: when given, refuse an adapter recorded for another base model.
      allow_pickle: accept `adapter_model.bin` (a pickle: off by default).
      param_dtype: storage dtype of the adapter factors.
      dropout: adapter dropout of the injected layers. PEFT's `lora_dropout` is a training
        setting and peft switches it off in eval mode, so the default 0 computes what a peft
        model computes at inference; pass `read_peft_config(dir).dropout` to train on with it.
      mesh, rules: put each factor straight into the sharding its `logical_axes` get under
        `rules` on `mesh` (`hf.assign_params`), as `from_pretrained(mesh=...)` does the base.

    Returns:
      The sorted paths of the adapted layers.

    Raises:
      CheckpointError: as `load_peft_factors`; a target that is already a `SlimLinear`, or a
        `LoRALinear` of another rank, alpha or scaling.
    """
    config, factors = load_peft_factors(directory, model, allow_pickle=allow_pickle,
                                        base_model_name_or_path=base_model_name_or_path)
    lora = config.lora_config(dropout=dropout, param_dtype=param_dtype)
    linears = _linear_layers(model)
    for path in factors:
        layer = linears[path]
        if isinstance(layer, SlimLinear):
            raise CheckpointError(f"layer {path!r} already holds a SLIM adapter; a PEFT LoRA "
                                  "adapter can only go onto a plain or LoRA linear layer")
        if isinstance(layer, LoRALinear):
            have = (layer.config.rank, layer.config.scale)
            if have != (lora.rank, lora.scale) or layer.merged:
                raise CheckpointError(
                    f"layer {path!r} already has a LoRA adapter (rank {have[0]}, scale {have[1]}"
                    f"{', merged' if layer.merged else ''}); the PEFT adapter has rank "
                    f"{lora.rank}, scale {lora.scale}: unmerge it or load onto a fresh model")
    plain = [path for path in factors if type(linears[path]) is nnx.Linear]
    if plain:
        pattern = "^(?:" + "|".join(re.escape(p) for p in plain) + ")$"
        inject(model, pattern, lora, rngs=nnx.Rngs(0) if rngs is None else rngs)
    arrays = {}
    for path, (a, b) in factors.items():
        arrays[f"{path}/lora_a"], arrays[f"{path}/lora_b"] = a, b
    # Per-layer names; a scanned model's stacks take them stacked (`hf.assign_params`).
    hf.assign_params(model, arrays, strict=False, source=str(directory), mesh=mesh, rules=rules)
    return list(factors)


def save_peft(
    model: nnx.Module,
    directory: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
) -> PeftLoRAConfig:
    """Write the model's LoRA adapters as a PEFT adapter directory that peft loads.

    `target_modules` is the sorted list of the adapted layers' names (e.g. `["q", "v"]`) when it
    selects exactly the adapted layers, else a regex of their full module names (sorted too), so
    the same adapter always gives the same files. Factors are written in
    float32 (float16 stays float16).

    Args:
      model: a `T5` or `Llama` whose adapted layers are all `LoRALinear` of one rank, alpha and
        scaling (merged or not: the factors are the same).
      directory: created if missing; `adapter_config.json` and `adapter_model.safetensors` are
        (over)written.
      base_model_name_or_path: the base model the adapter belongs to (a hub id or directory),
        as `peft.PeftModel.from_pretrained` records it.

    Returns:
      The written config.

    Raises:
      CheckpointError: the model has no LoRA adapter, has SLIM adapters, or its LoRA layers
        differ in rank, alpha or scaling (named).
    """
    naming = _naming(model)
    model = per_layer_view(model)  # a scanned model's adapters under per-layer names
    layers = adapted_layers(model)
    slim = [p for p, layer in layers.items() if not isinstance(layer, LoRALinear)]
    if slim:
        raise CheckpointError(f"SLIM layers have no PEFT LoRA form: {', '.join(slim[:5])}")
    if not layers:
        raise CheckpointError(f"the {type(model).__name__} has no LoRA adapter to save; adapt "
                              "layers first (slim_jax.nn.inject with a LoRAConfig)")
    settings = {(lay.config.rank, lay.config.alpha, lay.config.rslora, lay.config.dropout): p
                for p, lay in layers.items()}
    if len(settings) > 1:
        raise CheckpointError("PEFT stores one rank, alpha and scaling per adapter, but the "
                              "LoRA layers differ: " + "; ".join(
                                  f"{p} (r, alpha, rslora, dropout) = {s}"
                                  for s, p in settings.items()))
    [(rank, alpha, rslora, dropout)] = list(settings)
    modules = {naming.hf_module(path): layer for path, layer in layers.items()}
    config = PeftLoRAConfig(
        rank=rank, alpha=alpha, use_rslora=rslora, dropout=dropout,
        target_modules=_target_rule(sorted(modules), _linear_layers(model), naming),
        base_model_name_or_path=str(base_model_name_or_path), task_type=naming.task_type)
    tensors = {}
    for module, layer in modules.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = _to_file(layer.lora_a[...]).T
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = _to_file(layer.lora_b[...]).T
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return config


def _to_file(value: jax.Array) -> np.ndarray:
    array = np.asarray(value)
    return array if array.dtype == np.float16 else array.astype(np.float32)


def _target_rule(adapted: list[str], linears: Mapping[str, nnx.Linear], naming: _Naming
                 ) -> tuple[str, ...] | str:
    """The shortest PEFT `target_modules` selecting exactly the `adapted` module names."""
    leaves = tuple(sorted({name.rsplit(".", 1)[-1] for name in adapted}))
    all_names = [naming.hf_module(path) for path in linears]
    if sorted(n for n in all_names if name_matches(leaves, n)) == adapted:
        return leaves
    return "(?:" + "|".join(re.escape(name) for name in adapted) + ")"
