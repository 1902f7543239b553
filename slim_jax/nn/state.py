"""Adapter state helpers: select, split and swap adapter parameters; merge; token masks.

The adapter parameters of a model are its `AdapterParam` variables (LoRA factors, experts,
routers). Typical uses:

- an optimiser over adapters only: `nnx.Optimizer(model, tx, wrt=AdapterParam)`;
- a frozen base shared by many adapter states (LoRAHub's population): `split_adapters` once,
  then `jax.vmap(adapter_apply(graphdef, fn), in_axes=(0, None, None))(population, rest, x)`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.nn.injection import ADAPTED_TYPES, AdaptedLinear, module_path
from slim_jax.nn.lora_linear import LoRALinear
from slim_jax.nn.slim_linear import SlimLinear
from slim_jax.nn.variables import AdapterParam

T = TypeVar("T")


def adapted_layers(model: nnx.Module) -> dict[str, AdaptedLinear]:
    """The adapted layers of a model by '/'-joined path, in path order.

    >>> from slim_jax.nn import LoRAConfig
    >>> layer = LoRALinear(2, 2, LoRAConfig(rank=1), rngs=nnx.Rngs(0))
    >>> list(adapted_layers(nnx.List([layer])))
    ['0']
    """
    layers = {
        module_path(path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, ADAPTED_TYPES)
    }
    return dict(sorted(layers.items()))


def adapter_paths(model: nnx.Module) -> list[str]:
    """The sorted paths of the adapted layers (`['layers/0/attn/q_proj', ...]`)."""
    return list(adapted_layers(model))


def adapter_state(model: nnx.Module) -> nnx.State:
    """A snapshot of the model's adapter parameters (`AdapterParam`) as an `nnx.State`.

    Unlike `nnx.state`, whose Variables are the model's own, the snapshot holds new Variables:
    later changes to the model do not show in it, so several snapshots can be kept (e.g. N
    trained adapters to stack). `nnx.update(model, snapshot)` puts one back.
    """
    return jax.tree.map(lambda leaf: leaf, nnx.state(model, AdapterParam))


def split_adapters(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, adapters, rest)`: `nnx.split(model, AdapterParam, ...)`.

    `nnx.merge(graphdef, adapters, rest)` rebuilds the model; `adapters` may be replaced by any
    state of the same structure (a composed or trained adapter).
    """
    return nnx.split(model, AdapterParam, ...)


def adapter_apply(
    graphdef: nnx.GraphDef, fn: Callable[..., T]
) -> Callable[..., T]:
    """A pure function `apply(adapters, rest, *args, **kwargs) = fn(model, *args, **kwargs)`.

    The model is rebuilt from `graphdef` with the given adapter state and the rest of the state,
    so `apply` can be `jax.jit`-ed and `jax.vmap`-ed over a population of adapter states with one
    shared frozen base (`in_axes=(0, None, ...)`): the base is passed once, never copied per
    candidate. State changes made by `fn` (cluster updates, rng counts) are discarded.

    Args:
      graphdef: from `split_adapters(model)`.
      fn: `fn(model, *args, **kwargs)`, e.g. `lambda m, x: m(x)`.

    >>> import jax.numpy as jnp
    >>> from slim_jax.nn import LoRAConfig
    >>> layer = LoRALinear(2, 3, LoRAConfig(rank=1), rngs=nnx.Rngs(0))
    >>> graphdef, adapters, rest = split_adapters(layer)
    >>> population = jax.tree.map(lambda v: jnp.stack([v, v]), adapters)
    >>> apply = adapter_apply(graphdef, lambda m, x: m(x))
    >>> jax.vmap(apply, in_axes=(0, None, None))(population, rest, jnp.ones((4, 2))).shape
    (2, 4, 3)
    """

    def apply(adapters: nnx.State, rest: nnx.State, *args: Any, **kwargs: Any) -> T:
        return fn(nnx.merge(graphdef, adapters, rest), *args, **kwargs)

    return apply


def merge_adapters(model: nnx.Module) -> list[str]:
    """Fold every `LoRALinear` adapter into its kernel (`W += scale * A B`), in place.

    The merged forward equals the unmerged one and costs a plain matmul; the adapter parameters
    are kept, so `unmerge_adapters` restores the base kernels. Returns the paths merged now.

    Raises:
      ConfigError: if the model holds a `SlimLinear`, whose per-token routing cannot be folded
        into a kernel.
    """
    layers = adapted_layers(model)
    slim = [path for path, layer in layers.items() if isinstance(layer, SlimLinear)]
    if slim:
        raise ConfigError(
            f"SlimLinear layers route every token differently and cannot be merged into their "
            f"kernels: {', '.join(slim[:10])}"
        )
    done = []
    for path, layer in layers.items():
        if isinstance(layer, LoRALinear) and not layer.merged:
            layer.merge()
            done.append(path)
    return done


def unmerge_adapters(model: nnx.Module) -> list[str]:
    """Undo `merge_adapters`: `W -= scale * A B` for every merged `LoRALinear`; returns paths."""
    done = []
    for path, layer in adapted_layers(model).items():
        if isinstance(layer, LoRALinear) and layer.merged:
            layer.unmerge()
            done.append(path)
    return done


def _slim_layers(model: nnx.Module, pattern: str | None) -> dict[str, SlimLinear]:
    layers = {p: m for p, m in adapted_layers(model).items() if isinstance(m, SlimLinear)}
    if pattern is None:
        return layers
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
    chosen = {p: m for p, m in layers.items() if regex.search(p)}
    if not chosen:
        raise ConfigError(
            f"pattern {pattern!r} matches no SlimLinear layer; SlimLinear layers: "
            f"{', '.join(list(layers)[:20]) or 'none'}"
        )
    return chosen


def set_token_mask(
    model: nnx.Module, mask: jax.Array | None, *, pattern: str | None = None
) -> list[str]:
    """Hand every `SlimLinear` (or those whose path matches `pattern`) the token weights for
    its cluster updates: `mask [batch, seq]`, 1 for real tokens and 0 for padding; None counts
    every token. The mask stays until set again; prefer the `token_mask` context manager.

    Works inside `nnx.jit` / `nnx.grad`. For encoder-decoder models set the encoder's and the
    decoder's masks on their own layers with `pattern` (cross-attention keys and values see
    encoder tokens). Returns the paths of the layers set.
    """
    layers = _slim_layers(model, pattern)
    for layer in layers.values():
        layer.token_mask.set_value(mask)
    return list(layers)


@contextlib.contextmanager
def token_mask(
    model: nnx.Module, mask: jax.Array | None, *, pattern: str | None = None
) -> Iterator[list[str]]:
    """`set_token_mask` for the duration of a `with` block, then None again.

    >>> import jax.numpy as jnp
    >>> from slim_jax.nn import SlimConfig, SlimLinear
    >>> model = nnx.List([SlimLinear(2, 2, SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(0))])
    >>> with token_mask(model, jnp.array([[1.0, 0.0]])):
    ...     y = model[0](jnp.ones((1, 2, 2)))
    >>> model[0].token_mask.get_value() is None
    True
    """
    paths = set_token_mask(model, mask, pattern=pattern)
    try:
        yield paths
    finally:
        set_token_mask(model, None, pattern=pattern)
