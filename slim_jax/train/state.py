"""The training state, and splitting a model into what trains, what stays frozen, what updates.

A model with adapters is split three ways (flax NNX filters):
  - `params`: the trained parameters (`AdapterParam`, a `nnx.LoRAParam`: LoRA factors, routers);
  - `frozen`: every other `nnx.Param` (the base model), never differentiated, optionally bf16;
  - `mutable`: every other variable (SLIM cluster statistics, RNG streams): updated by the forward
    pass as state, carried from step to step, never by gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from slim_jax.errors import ConfigError

Filter = Any  # a flax NNX filter: a Variable type, a predicate, ...


@struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint stores), a pytree.

    Attributes:
      step: `[]` int32, optimiser updates applied so far.
      params: the trained adapter parameters (`nnx.State`).
      mutable: the model's non-parameter variables (cluster statistics, RNG state).
      opt_state: the optax state (AdamW moments shaped like `params`).
    """

    step: jax.Array
    params: nnx.State
    mutable: nnx.State
    opt_state: optax.OptState


def split_model(
    model: nnx.Module, wrt: Filter = nnx.LoRAParam
) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """`(graphdef, params, frozen, mutable)` of `model` (see the module docstring).

    Args:
      model: a model with adapters injected.
      wrt: the filter of the trained variables; `nnx.LoRAParam` selects every `AdapterParam`.

    Raises:
      ConfigError: when nothing matches `wrt` (adapters were not injected).

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> class Tiny(nnx.Module):
    ...     def __init__(self):
    ...         self.w = nnx.Param(jnp.ones((2, 2)))
    ...         self.a = nnx.LoRAParam(jnp.zeros((2, 1)))
    >>> _, params, frozen, mutable = split_model(Tiny())
    >>> list(params), list(frozen), list(mutable)
    (['a'], ['w'], [])
    """
    graphdef, params, frozen, mutable = nnx.split(model, wrt, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise ConfigError(
            f"the model has no trainable variables matching {wrt!r}: inject adapters first "
            "(slim_jax.nn.inject), or pass the filter of the parameters to train"
        )
    return graphdef, params, frozen, mutable


def merge_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    mutable: nnx.State,
    *,
    copy: bool = False,
) -> nnx.Module:
    """The model again, from the pieces `split_model` returned; `copy=True` gives it its own
    Variables (changing the model then leaves the states as they were)."""
    return nnx.merge(graphdef, params, frozen, mutable, copy=copy)


def resolve_frozen_dtype(name: str, platform: str | None = None) -> jnp.dtype | None:
    """The dtype to cast the frozen base to, or None to keep it.

    "auto" means bfloat16 on accelerators (TPU, GPU) and no cast on CPU; "keep" never casts.

    >>> resolve_frozen_dtype("auto", "cpu") is None, resolve_frozen_dtype("auto", "tpu")
    (True, dtype(bfloat16))
    """
    if name == "keep":
        return None
    if name == "auto":
        platform = platform or jax.default_backend()
        return None if platform == "cpu" else jnp.dtype(jnp.bfloat16)
    return jnp.dtype(name)


def cast_floating(tree: Any, dtype: jnp.dtype | None) -> Any:
    """`tree` with its floating-point leaves cast to `dtype` (no change when `dtype` is None).

    >>> import jax.numpy as jnp
    >>> cast_floating({"w": jnp.ones(2), "i": jnp.arange(2)}, jnp.bfloat16)["w"].dtype
    dtype(bfloat16)
    """
    if dtype is None:
        return tree

    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)
