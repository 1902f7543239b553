"""Low-rank adaptation (LoRA): the scale, the delta `scale * (x A) B`, the standard initialisers.

A LoRA adapter of a linear layer `y = x W + b` (W: `[d_in, d_out]`) adds `scale * (x A) B` with
A: `[d_in, r]`, B: `[r, d_out]`. The product is always taken in that order, so that no dense
`[d_in, d_out]` matrix is ever formed: it costs `r * (d_in + d_out)` multiply-adds per token.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from slim_jax.errors import ConfigError, ShapeError

InitA = Literal["kaiming_uniform", "gaussian"]
INIT_A_METHODS: tuple[str, ...] = ("kaiming_uniform", "gaussian")


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The LoRA scale: `alpha / r`, or rsLoRA's `alpha / sqrt(r)`.

    Args:
      alpha: the LoRA alpha (PEFT's `lora_alpha`).
      rank: the adapter rank r, at least 1.
      rslora: use rank-stabilised scaling `alpha / sqrt(r)` (Kalajdzievski, 2023).

    Returns:
      The scalar multiplying `(x A) B`.

    >>> lora_scale(32, 16), lora_scale(32, 16, rslora=True)
    (2.0, 8.0)
    """
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array) -> jax.Array:
    """The LoRA update `scale * (x A) B` of a linear layer's output, computed `((x A) scale) B`.

    Args:
      x: `[..., d_in]` inputs.
      a: `[d_in, r]` down-projection A.
      b: `[r, d_out]` up-projection B.
      scale: scalar, usually `lora_scale(alpha, r)`.

    Returns:
      `[..., d_out]`, in the promoted dtype of the inputs.

    >>> x, a, b = jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.full((1, 4), 0.5)
    >>> lora_delta(x, a, b, 2.0).tolist()
    [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or x.shape[-1] != a.shape[0]:
        raise ShapeError(
            f"lora_delta needs x [..., d_in], a [d_in, r], b [r, d_out]; got x {x.shape}, "
            f"a {a.shape}, b {b.shape}"
        )
    # One [tokens, d_in] matrix, and the scale on the rank-r intermediate: both products (and
    # their gradients, e.g. A's x^T dH) are then plain 2-D matmuls with a single contraction,
    # with no relayout of the activations and one pass less over [tokens, d_out].
    x2 = x.reshape(-1, x.shape[-1])
    return ((x2 @ a) * scale @ b).reshape(*x.shape[:-1], b.shape[-1])


def init_lora_a(
    key: jax.Array,
    shape: tuple[int, ...],
    method: InitA = "kaiming_uniform",
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Initial LoRA A factors of shape `[..., d_in, r]` (leading axes: e.g. experts).

    - `"kaiming_uniform"` (PEFT's default, `kaiming_uniform_(a=sqrt(5))` on the `[r, d_in]` torch
      weight): `U(-1/sqrt(d_in), 1/sqrt(d_in))`.
    - `"gaussian"` (PEFT's `init_lora_weights="gaussian"`): `N(0, std=1/r)`.

    Args:
      key: PRNG key.
      shape: `(..., d_in, r)`.
      method: one of `"kaiming_uniform"`, `"gaussian"`.
      dtype: storage dtype.

    >>> a = init_lora_a(jax.random.key(0), (16, 4))
    >>> a.shape, bool(jnp.all(jnp.abs(a) <= 0.25))
    ((16, 4), True)
    """
    if len(shape) < 2:
        raise ShapeError(f"LoRA A needs a shape (..., d_in, r), got {shape}")
    d_in, rank = shape[-2], shape[-1]
    if method == "kaiming_uniform":
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
    if method == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    raise ConfigError(f"unknown LoRA A initialiser {method!r}; accepted: {INIT_A_METHODS}")


def init_lora_b(shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Initial LoRA B factors `[..., r, d_out]`: zeros, so that a fresh adapter changes nothing.

    >>> init_lora_b((2, 3)).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    return jnp.zeros(shape, dtype)
