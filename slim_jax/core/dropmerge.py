"""Fast dynamic merging (SLIM.md s3): DARE-style sparsification of the LoRA delta by channel masks.

The merged-weight view is `W + M (.) (scale * A B)` with a random keep mask M of keep ratio `1 - p`.
The fast form masks whole input channels and output channels instead of elements: masks
`m_in [d_in]`, `m_out [d_out]`, each with keep ratio `sqrt(1 - p)`, so that `M = m_in m_out^T`
keeps a fraction `1 - p` of the delta in expectation, and the delta is rescaled by `1 / (1 - p)`
(DARE's rescale, switchable) so that its expectation is unchanged:

    delta = scale / (1 - p) * (((x * m_in) A) B) * m_out

Two element-wise products, no dense `[d_in, d_out]` matrix. `p = 0` is exactly the plain delta.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from slim_jax.core.lora import lora_delta
from slim_jax.core.routing import lora_mixture_delta
from slim_jax.errors import ConfigError


def check_drop_rate(p: float, name: str = "dropmerge_p") -> None:
    """Raise `ConfigError` unless `0 <= p < 1`."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{name} must be in [0, 1) (the fraction of the delta dropped), got {p}")


def dropmerge_rescale(p: float, *, rescale: bool = True) -> float:
    """The factor applied to the masked delta: `1 / (1 - p)` with DARE's rescale, else 1.

    >>> dropmerge_rescale(0.75), dropmerge_rescale(0.75, rescale=False)
    (4.0, 1.0)
    """
    check_drop_rate(p)
    return 1.0 / (1.0 - p) if rescale else 1.0


def channel_masks(key: jax.Array, d_in: int, d_out: int, p: float) -> tuple[jax.Array, jax.Array]:
    """Random input and output channel keep masks, each with keep ratio `sqrt(1 - p)`.

    SLIM.md s3 (decision): `q_in = q_out = sqrt(1 - p)`, so `q_in * q_out = 1 - p`. With `p = 0`
    both masks are all ones (the key is not used).

    Both masks come from one draw of `d_in + d_out` random 32-bit words (one threefry call per
    layer per forward pass, not a key split and two Bernoulli draws): a channel is kept where its
    word `u` satisfies `u < round(q * 2^32)`, which has probability `q` up to `2^-32`, channels
    independent.

    Args:
      key: PRNG key; one key gives one pair of masks.
      d_in: input channels.
      d_out: output channels.
      p: drop rate in `[0, 1)` (static Python float).

    Returns:
      `(m_in [d_in], m_out [d_out])` float32 masks of zeros and ones.

    >>> m_in, m_out = channel_masks(jax.random.key(0), 3, 2, 0.0)
    >>> m_in.tolist(), m_out.tolist()
    ([1.0, 1.0, 1.0], [1.0, 1.0])
    """
    check_drop_rate(p)
    if p == 0.0:
        return jnp.ones((d_in,), jnp.float32), jnp.ones((d_out,), jnp.float32)
    # P(u < t) = t / 2^32 for u uniform on [0, 2^32); p > 0 gives t < 2^32.
    threshold = min(round(math.sqrt(1.0 - p) * 2.0**32), 2**32 - 1)
    bits = jax.random.bits(key, (d_in + d_out,), jnp.uint32)
    kept = (bits < jnp.uint32(threshold)).astype(jnp.float32)
    return kept[:d_in], kept[d_in:]


def masked_lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float | jax.Array,
    masks: tuple[jax.Array, jax.Array],
    p: float,
    *,
    rescale: bool = True,
) -> jax.Array:
    """`scale / (1 - p) * (((x * m_in) A) B) * m_out`: the fast dynamic-merging LoRA delta.

    Args:
      x: `[..., d_in]` inputs.
      a: `[d_in, r]`; b: `[r, d_out]`.
      scale: LoRA scale.
      masks: `(m_in [d_in], m_out [d_out])` from `channel_masks`.
      p: the drop rate the masks were drawn with.
      rescale: apply DARE's `1 / (1 - p)`.

    Returns:
      `[..., d_out]`.

    >>> x, a, b = jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 2))
    >>> masks = (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    >>> masked_lora_delta(x, a, b, 1.0, masks, 0.75).tolist()
    [[0.0, 4.0]]
    """
    m_in, m_out = masks
    factor = dropmerge_rescale(p, rescale=rescale)
    x_in = x * m_in.astype(x.dtype)
    return lora_delta(x_in, a, b, scale * factor) * m_out.astype(x.dtype)


def masked_mixture_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    gates: jax.Array,
    scale: float | jax.Array,
    masks: tuple[jax.Array, jax.Array],
    p: float,
    *,
    rescale: bool = True,
) -> jax.Array:
    """The gated mixture of LoRA experts under one shared pair of channel masks (SLIM.md s3).

    Decision: one mask pair per layer per call, shared by all experts. Shapes as in
    `slim_jax.core.routing.lora_mixture_delta`: x `[..., d_in]`, a `[E, d_in, r]`,
    b `[E, r, d_out]`, gates `[..., E]`; returns `[..., d_out]`.

    >>> a, b = jnp.ones((2, 2, 1)), jnp.ones((2, 1, 2))
    >>> masks = (jnp.ones(2), jnp.array([1.0, 0.0]))
    >>> masked_mixture_delta(jnp.ones(2), a, b, jnp.array([0.5, 0.5]), 1.0, masks, 0.0).tolist()
    [2.0, 0.0]
    """
    m_in, m_out = masks
    factor = dropmerge_rescale(p, rescale=rescale)
    x_in = x * m_in.astype(x.dtype)
    return lora_mixture_delta(x_in, a, b, gates, scale * factor) * m_out.astype(x.dtype)
