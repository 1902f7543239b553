"""`inject`: swap chosen `nnx.Linear` layers of any NNX model for adapted ones, in place."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.nn.config import LoRAConfig, SlimConfig
from slim_jax.nn.lora_linear import LoRALinear
from slim_jax.nn.slim_linear import SlimLinear
from slim_jax.nn.stack import has_stacks, per_layer

AdaptedLinear = LoRALinear | SlimLinear
ADAPTED_TYPES: tuple[type[nnx.Module], ...] = (LoRALinear, SlimLinear)

Path = tuple[Any, ...]


def module_path(path: Path) -> str:
    """A module path as a '/'-joined string: `('layers', 0, 'q_proj') -> 'layers/0/q_proj'`.

    >>> module_path(("layers", 0, "attn", "q_proj"))
    'layers/0/attn/q_proj'
    """
    return "/".join(str(part) for part in path)


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, Sequence | Mapping) and not isinstance(node, str):
        return node[key]
    return getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, MutableSequence | MutableMapping):
        node[key] = value
    else:
        setattr(node, key, value)


def _replace(model: nnx.Module, path: Path, value: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    _set_child(parent, path[-1], value)


def _all_paths(model: nnx.Module) -> dict[int, list[Path]]:
    """Every path of every `nnx.Linear` (a shared layer has several)."""
    paths: dict[int, list[Path]] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            paths.setdefault(id(module), []).append(path)
    for dup in nnx.find_duplicates(model, only=nnx.Linear):
        first = dup[0]
        node = model
        for key in first:
            node = _child(node, key)
        known = paths.setdefault(id(node), [])
        known.extend(p for p in dup if p not in known)
    return paths


def inject(
    model: nnx.Module, pattern: str, config: LoRAConfig | SlimConfig, *, rngs: nnx.Rngs
) -> list[str]:
    """Replace, in place, every plain `nnx.Linear` whose path matches `pattern` by an adapted layer.

    A `LoRAConfig` gives `LoRALinear`, a `SlimConfig` gives `SlimLinear`. Paths are '/'-joined
    attribute names and list indices (`layers/0/attn/q_proj`), matched with `re.search`, so
    `"q_proj|v_proj"` or `r"attn/(q|v)$"` work like PEFT's `target_modules`. The adapted layer keeps
    the base's `kernel`/`bias` Variables under the same names, so parameter paths are unchanged
    and base checkpoints still load. Layers that are already adapted are left alone; a layer
    shared at several paths is replaced at all of them by one adapted layer.

    Args:
      model: any NNX module (nested modules, `nnx.List`, `nnx.Dict` and lists work).
      pattern: a regular expression over the layer paths.
      config: the adapter of every matched layer.
      rngs: initialises the adapters (layers are built in path order).

    Returns:
      The sorted paths of the layers adapted.

    A scanned model (`slim_jax.nn.stack.LayerStack`) is adapted layer by layer under its
    per-layer paths (`layers/0/...`) and stacked again, so it gets the adapters (and the
    initial values) an unscanned model gets; the pattern must then adapt every stacked layer alike.

    Raises:
      ConfigError: an invalid regex, or one that matches no plain `nnx.Linear`; the message lists
        the linear layers available; on a scanned model, adapters on some stacked layers only.

    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(4, 4, rngs=rngs)
    ...         self.up_proj = nnx.Linear(4, 8, rngs=rngs)
    >>> class Model(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.layers = nnx.List([Block(rngs), Block(rngs)])
    >>> model = Model(nnx.Rngs(0))
    >>> inject(model, r"q_proj$", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    ['layers/0/q_proj', 'layers/1/q_proj']
    >>> type(model.layers[1].q_proj).__name__
    'LoRALinear'
    """
    if has_stacks(model):
        with per_layer(model, frozen_abstract=True):  # the base is not copied
            return inject(model, pattern, config, rngs=rngs)
    if isinstance(config, LoRAConfig):
        layer_type: type[AdaptedLinear] = LoRALinear
    elif isinstance(config, SlimConfig):
        layer_type = SlimLinear
    else:
        raise ConfigError(
            f"config must be a LoRAConfig or a SlimConfig, got {type(config).__name__}"
        )
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err

    plain: list[tuple[list[Path], nnx.Linear]] = []
    adapted: list[str] = []
    by_id = {id(m): m for _, m in nnx.iter_modules(model)}
    for node_id, paths in _all_paths(model).items():
        module = by_id[node_id]
        if isinstance(module, ADAPTED_TYPES):
            adapted.extend(module_path(p) for p in paths)
        elif type(module) is nnx.Linear:
            plain.append((sorted(paths, key=module_path), module))
    plain.sort(key=lambda item: module_path(item[0][0]))
    matched = [
        (paths, m) for paths, m in plain if any(regex.search(module_path(p)) for p in paths)
    ]
    if not matched:
        available = [module_path(paths[0]) for paths, _ in plain]
        shown = ", ".join(available[:20]) + (f", ... ({len(available)} in all)"
                                             if len(available) > 20 else "")
        extra = f"; already adapted: {', '.join(sorted(adapted)[:10])}" if adapted else ""
        raise ConfigError(
            f"pattern {pattern!r} matches no nnx.Linear layer of the model; available linear "
            f"layers: {shown or 'none'}{extra}"
        )
    done: list[str] = []
    for paths, linear in matched:
        if () in paths:
            raise ConfigError("inject cannot replace the model itself; wrap the linear in a module")
        new = layer_type.from_linear(linear, config, rngs=rngs)
        for path in paths:
            _replace(model, path, new)
        done.append(module_path(paths[0]))
    return sorted(done)
