"""The SLIM L1 adapter penalty (SLIM.md s4)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

from slim_jax.errors import ShapeError


def lora_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """`sum_e (mean|B_e| + mean|A_e|)` over the LoRA experts of one layer.

    SLIM.md s4: the paper divides `sum|A_e|` by `r * d_in` and `sum|B_e|` by `r * d_out`, i.e. the
    means over each factor. Leading axes (experts) are summed; a plain LoRA layer is one expert.

    Args:
      a: `[..., d_in, r]` A factors (e.g. `[E, d_in, r]`).
      b: `[..., r, d_out]` B factors with the same leading axes.

    Returns:
      `[]` float32.

    >>> lora_l1(jnp.full((2, 4, 1), -0.5), jnp.ones((2, 1, 3))).tolist()
    3.0
    """
    if a.ndim < 2 or a.shape[:-2] != b.shape[:-2]:
        raise ShapeError(f"lora_l1 needs a [..., d_in, r] and b [..., r, d_out]; got {a.shape}, "
                         f"{b.shape}")
    mean_a = jnp.mean(jnp.abs(a.astype(jnp.float32)), axis=(-2, -1))
    mean_b = jnp.mean(jnp.abs(b.astype(jnp.float32)), axis=(-2, -1))
    return jnp.sum(mean_a + mean_b)


def slim_l1(factors: Iterable[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """The SLIM L1 penalty summed over layers: `sum_layers sum_e (mean|B_e| + mean|A_e|)`.

    Args:
      factors: `(a, b)` per adapted layer, shapes as in `lora_l1`.

    Returns:
      `[]` float32 (0 for no layers).

    >>> slim_l1([(jnp.ones((2, 1)), jnp.ones((1, 2))), (jnp.ones((2, 1)), jnp.zeros((1, 2)))])
    Array(3., dtype=float32)
    """
    total = jnp.zeros((), jnp.float32)
    for a, b in factors:
        total = total + lora_l1(a, b)
    return total
