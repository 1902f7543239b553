"""What LoRALinear and SlimLinear share: adopting a base `nnx.Linear`, axis names, dtypes, rngs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.errors import ConfigError, ShapeError


def adopt_linear(
    module: nnx.Module,
    in_features: int,
    out_features: int,
    base: nnx.Linear | None,
    rngs: nnx.Rngs,
    linear_kwargs: dict[str, Any],
) -> None:
    """Give `module` the attributes of a base `nnx.Linear` (the same `kernel`/`bias` Variables).

    With `base=None` a fresh `nnx.Linear(in_features, out_features, **linear_kwargs)` is built.
    The base's attributes are taken as they are, so the inherited `nnx.Linear.__call__` computes
    exactly the base output and `kernel`/`bias` keep their parameter paths.
    """
    if base is None:
        base = nnx.Linear(in_features, out_features, rngs=rngs, **linear_kwargs)
    elif linear_kwargs:
        raise ConfigError(
            f"got both a base linear and linear arguments {sorted(linear_kwargs)}; the base's "
            "own settings are used, pass one or the other"
        )
    if type(base) is not nnx.Linear:
        raise ConfigError(f"can only adapt a plain flax.nnx.Linear, got {type(base).__name__}")
    if (base.in_features, base.out_features) != (in_features, out_features):
        raise ShapeError(
            f"base linear is {base.in_features} -> {base.out_features}, but the adapted layer "
            f"was asked for {in_features} -> {out_features}"
        )
    for name, value in vars(base).items():
        if name.startswith("_"):
            continue  # NNX's own bookkeeping
        if value is None and name == "bias":
            value = nnx.data(None)
        setattr(module, name, value)


def kernel_axes(kernel: nnx.Variable) -> tuple[str | None, str | None]:
    """The logical axis names `(in, out)` of a base kernel, `(None, None)` when it has none."""
    axes = kernel.get_metadata("logical_axes", None)
    if axes is None or len(axes) != 2:
        return None, None
    return axes[0], axes[1]


def fork_stream(rngs: nnx.Rngs, collection: str, layer: str) -> nnx.RngStream:
    """A new stream tagged `collection`, seeded from `rngs[collection]` (or `default`).

    The tag is the collection's name even when the key came from `default`, so that
    `nnx.reseed(model, **{collection: seed})` always reaches the layer's stream.
    """
    try:
        return nnx.RngStream(rngs[collection](), tag=collection)
    except KeyError as err:
        raise ConfigError(
            f"{layer} needs a random stream {collection!r} (or 'default'), but the given "
            f"nnx.Rngs has only {sorted(rngs)}; pass e.g. nnx.Rngs(0) or "
            f"nnx.Rngs(params=0, {collection}=1)"
        ) from err


def compute_dtype(config_dtype: Any, base_dtype: Any, *arrays: jax.Array) -> jnp.dtype:
    """The adapter path's compute dtype: the config's, else the base layer's, else promotion."""
    if config_dtype is not None:
        return jnp.dtype(config_dtype)
    if base_dtype is not None:
        return jnp.dtype(base_dtype)
    return jnp.result_type(*arrays)
