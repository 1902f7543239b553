"""An NNX model as a pure function: parameters in, outputs and the model's updated state out.

A forward pass may change more than its outputs: a SLIM layer with dynamic merging draws fresh
channel masks from its own RNG stream on every call (SLIM.md s3), which advances the stream's
count; in training mode it also updates its cluster statistics. Inside `jax.jit`, and above all
inside a `jax.lax.while_loop` body, such a mutation must be threaded through explicitly. The
model is split once into
  - `graphdef`: its structure (static, hashable: the key of the compiled program),
  - `params`: every `nnx.Param` (adapters included), read-only in a forward pass,
  - `rest`: everything else (RNG keys and counts, SLIM cluster statistics, token masks),
and every call rebuilds the model in the current trace from the three, runs it and returns the
new `rest`, which the caller carries into the next call (the loop carry) and finally writes back
into the Python model with `nnx.update`.

>>> import jax, jax.numpy as jnp
>>> from slim_jax.nn import SlimConfig, SlimLinear
>>> layer = SlimLinear(2, 2, SlimConfig(rank=1, num_clusters=1, dropmerge_p=0.5),
...                    rngs=nnx.Rngs(0), use_running_average=True)
>>> graphdef, params, rest = split_model(layer)
>>> _, rest = jax.jit(lambda r: call_split(graphdef, params, r, lambda m: m(jnp.ones((1, 2)))))(
...     rest)
>>> nnx.update(layer, rest)
>>> int(layer.rngs.count[...])  # one mask pair drawn
1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flax import nnx

T = TypeVar("T")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, params, rest)`: the model's structure, its `nnx.Param`s and all other state.

    >>> graphdef, params, rest = split_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> sorted(params), sorted(rest)
    (['bias', 'kernel'], [])
    """
    return nnx.split(model, nnx.Param, ...)


def call_split(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    fn: Callable[[nnx.Module], T],
) -> tuple[T, nnx.State]:
    """`fn(model)` on the model rebuilt from its parts, and the model's `rest` after the call.

    Traceable anywhere (jit, a while-loop or scan body): the model is rebuilt inside the current
    trace, so its RNG streams may advance there. The returned `rest` has the same tree structure
    as the given one, so it can be a loop carry.

    Args:
      graphdef, params, rest: from `split_model`.
      fn: runs the model, e.g. `lambda m: m(tokens)`; returns any pytree.

    Returns:
      `(fn(model), rest)`.

    >>> import jax.numpy as jnp
    >>> graphdef, params, rest = split_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> out, _ = call_split(graphdef, params, rest, lambda m: m(jnp.ones((4, 2))))
    >>> out.shape
    (4, 3)
    """
    model = nnx.merge(graphdef, params, rest)
    out = fn(model)
    return out, nnx.state(model, nnx.Not(nnx.Param))
