"""The adapter spec: which layers carry which adapter with which config, as JSON.

Arrays alone do not say how to rebuild adapted layers (alpha, top-k, yielding, ...), so a
slim_jax adapter checkpoint records the spec in its metadata under `ADAPTER_SPEC_KEY`: a JSON list
of groups, one per distinct adapter config, in layer order,
`[{"adapter": "lora" | "slim", "config": {LoRAConfig / SlimConfig fields}, "layers": [path, ...]}]`.
`adapter_spec(model)` writes it, `inject_spec(model, spec)` rebuilds the layers on a fresh model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.nn.config import LoRAConfig, SlimConfig
from slim_jax.nn.injection import inject, module_path
from slim_jax.nn.lora_linear import LoRALinear
from slim_jax.nn.stack import has_stacks, per_layer, per_layer_view
from slim_jax.nn.state import adapted_layers

ADAPTER_SPEC_KEY = "adapter_spec"
"""The key of the adapter spec in a slim_jax checkpoint's JSON metadata."""
AdapterSpec = list[dict[str, Any]]
_KINDS: dict[str, type[LoRAConfig] | type[SlimConfig]] = {"lora": LoRAConfig, "slim": SlimConfig}


def config_json(config: LoRAConfig | SlimConfig) -> dict[str, Any]:
    """The config's fields as JSON values (dtypes by name)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None and not isinstance(value, str | int | float | bool):
            value = jnp.dtype(value).name
        out[field.name] = value
    return out


def adapter_spec(model: nnx.Module) -> AdapterSpec:
    """The adapter spec of `model` (module docstring): its adapted layers grouped by config.

    Merged LoRA layers are described like unmerged ones (their factors are the same).

    >>> model = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0)) for _ in range(2)])
    >>> _ = inject(model, "0", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
    >>> [(g["adapter"], g["config"]["rank"], g["layers"]) for g in adapter_spec(model)]
    [('lora', 2, ['0'])]
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    # A scanned model is described by its per-layer paths, as an unscanned one.
    for path, layer in adapted_layers(per_layer_view(model)).items():
        kind = "lora" if isinstance(layer, LoRALinear) else "slim"
        config = config_json(layer.config)
        group = groups.setdefault((kind, repr(sorted(config.items()))),
                                  {"adapter": kind, "config": config, "layers": []})
        group["layers"].append(path)
    return list(groups.values())


def parse_spec(spec: Any, source: str) -> dict[str, LoRAConfig | SlimConfig]:
    """`{layer path: config}` of a JSON adapter spec, every field checked."""
    if not isinstance(spec, list) or not spec:
        raise CheckpointError(f"{source}: the adapter spec must be a non-empty list of groups "
                              f"{{'adapter', 'config', 'layers'}}, got {type(spec).__name__}")
    layers: dict[str, LoRAConfig | SlimConfig] = {}
    for i, group in enumerate(spec):
        if not isinstance(group, Mapping) or set(group) != {"adapter", "config", "layers"}:
            raise CheckpointError(f"{source}: adapter spec group {i} must have exactly the keys "
                                  f"'adapter', 'config' and 'layers', got {group!r:.200}")
        kind, fields, paths = group["adapter"], group["config"], group["layers"]
        if kind not in _KINDS:
            raise CheckpointError(f"{source}: adapter spec group {i} has adapter {kind!r}; "
                                  f"accepted: {', '.join(map(repr, _KINDS))}")
        cls = _KINDS[kind]
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, Mapping) or set(fields) - known:
            unknown = sorted(set(fields) - known) if isinstance(fields, Mapping) else fields
            raise CheckpointError(f"{source}: adapter spec group {i} ({cls.__name__}) has "
                                  f"unknown fields {unknown}; accepted: {sorted(known)}")
        try:
            config = cls(**fields)
        except (ConfigError, TypeError) as err:
            raise CheckpointError(f"{source}: adapter spec group {i}: {err}") from err
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise CheckpointError(f"{source}: adapter spec group {i}: 'layers' must be a list "
                                  "of layer paths such as 'layers/0/self_attn/q_proj'")
        for path in paths:
            if path in layers:
                raise CheckpointError(f"{source}: the adapter spec lists layer {path!r} twice")
            layers[path] = config
    return layers


def inject_spec(model: nnx.Module, spec: AdapterSpec, *, rngs: nnx.Rngs | None = None,
                source: str = "adapter spec") -> list[str]:
    """Inject the adapters an adapter spec describes into `model`, in place.

    Args:
      model: a model whose listed layers are plain `nnx.Linear`.
      spec: from `adapter_spec` (or a checkpoint's metadata).
      rngs: initialises the new adapters (to be overwritten by a restore); default seed 0.
      source: how errors name where the spec came from.

    Returns:
      The sorted paths of the layers adapted.

    Raises:
      CheckpointError: a malformed spec, or a layer the model lacks (naming it).

    >>> model = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0)) for _ in range(2)])
    >>> spec = [{"adapter": "lora", "config": {"rank": 2}, "layers": ["1"]}]
    >>> inject_spec(model, spec), type(model[1]).__name__
    (['1'], 'LoRALinear')
    """
    if has_stacks(model):  # a scanned model: its layers one by one, stacked again after
        with per_layer(model, frozen_abstract=True):  # the base is not copied
            return inject_spec(model, spec, rngs=rngs, source=source)
    layers = parse_spec(spec, source)
    linears = {module_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
    missing = [path for path in layers if path not in linears]
    if missing:
        raise CheckpointError(
            f"{source} puts adapters on {len(missing)} layer(s) this {type(model).__name__} does "
            f"not have: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (is it for "
            f"another base model? its linear layers look like {', '.join(sorted(linears)[:3])})")
    taken = [path for path in layers if type(linears[path]) is not nnx.Linear]
    if taken:
        raise CheckpointError(f"{source}: layer(s) {', '.join(taken[:5])} already carry an "
                              "adapter; load onto a model without adapters")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    by_config: dict[int, tuple[LoRAConfig | SlimConfig, list[str]]] = {}
    for path, config in layers.items():
        by_config.setdefault(id(config), (config, []))[1].append(path)
    for config, paths in by_config.values():
        pattern = "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
        inject(model, pattern, config, rngs=rngs)
    return sorted(layers)
