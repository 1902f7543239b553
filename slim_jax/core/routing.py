"""The SLIM soft router: top-k and dense gates, identity slots, and the mixture of LoRA experts.

Gate layout: a router with `E_l` LoRA experts and `E_i` identity experts produces logits
`[..., E_l + E_i]`; the LoRA experts are the first `E_l` columns and the identity experts the last
`E_i` columns. An identity expert is a zero change, so weight routed to it simply removes LoRA
contribution (SLIM.md s1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slim_jax.errors import ConfigError, ShapeError


def check_top_k(k: int, num_experts: int) -> None:
    """Raise `ConfigError` unless `1 <= k <= num_experts`."""
    if not 1 <= k <= num_experts:
        raise ConfigError(
            f"top_k must be between 1 and the number of experts ({num_experts}), got {k}"
        )


def top_k_weights(logits: jax.Array, k: int) -> jax.Array:
    """Sparse routing weights: softmax over the k largest logits, zeros elsewhere.

    SLIM.md s1: `g = top-k softmax of logits, renormalised over the k selected so they sum to 1`.
    Ties are broken towards the lower expert index (`lax.top_k`), so exactly k entries are selected
    per token; with finite logits whose spread is below ~80 all k selected weights are non-zero.
    Gradients flow into the selected logits.

    Args:
      logits: `[..., E]` router logits.
      k: number of experts each token uses, `1 <= k <= E` (a static Python int).

    Returns:
      `[..., E]` float32 weights; per token k of them are selected and they sum to 1.

    >>> top_k_weights(jnp.array([1.0, 3.0, 3.0, 0.0]), 2).tolist()
    [0.0, 0.5, 0.5, 0.0]
    """
    num_experts = logits.shape[-1]
    check_top_k(k, num_experts)
    logits = logits.astype(jnp.float32)
    values, index = jax.lax.top_k(logits, k)  # [..., k], lower index first on ties
    weights = jax.nn.softmax(values, axis=-1)
    one_hot = jax.nn.one_hot(index, num_experts, dtype=weights.dtype)  # [..., k, E]
    return jnp.einsum("...k,...ke->...e", weights, one_hot)


def dense_weights(logits: jax.Array) -> jax.Array:
    """Dense routing weights (the `k = all` ablation): softmax over every expert.

    Args:
      logits: `[..., E]` router logits.

    Returns:
      `[..., E]` float32 weights summing to 1.

    >>> dense_weights(jnp.zeros(4)).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def split_gates(gates: jax.Array, num_identity: int) -> tuple[jax.Array, jax.Array]:
    """Split `[..., E_l + E_i]` gates into LoRA gates `[..., E_l]` and identity gates `[..., E_i]`.

    The identity experts are the last `num_identity` columns.

    >>> lora, ident = split_gates(jnp.array([0.5, 0.0, 0.5]), 1)
    >>> lora.tolist(), ident.tolist()
    ([0.5, 0.0], [0.5])
    """
    num_experts = gates.shape[-1]
    if not 0 <= num_identity <= num_experts:
        raise ConfigError(
            f"num_identity must be between 0 and the number of experts ({num_experts}), "
            f"got {num_identity}"
        )
    cut = num_experts - num_identity
    return gates[..., :cut], gates[..., cut:]


def lora_mixture_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, gates: jax.Array, scale: float | jax.Array
) -> jax.Array:
    """The gated sum of LoRA experts: `sum_e g_e * scale * (x A_e) B_e` (SLIM.md s1).

    Computed as two einsums: `h = x A` for all experts at once (`[..., E, r]`), gated, then
    contracted with B over experts and rank together. No dense `[d_in, d_out]` matrix is formed.

    Args:
      x: `[..., d_in]` inputs.
      a: `[E, d_in, r]` A factors of the LoRA experts.
      b: `[E, r, d_out]` B factors.
      gates: `[..., E]` weight of each LoRA expert per token (identity columns already removed).
      scale: scalar LoRA scale.

    Returns:
      `[..., d_out]`.

    >>> a = jnp.ones((2, 3, 1)); b = jnp.ones((2, 1, 2))
    >>> lora_mixture_delta(jnp.ones(3), a, b, jnp.array([0.25, 0.5]), 2.0).tolist()
    [4.5, 4.5]
    """
    if (
        a.ndim != 3
        or b.ndim != 3
        or a.shape[0] != b.shape[0]
        or a.shape[2] != b.shape[1]
        or x.shape[-1] != a.shape[1]
        or gates.shape[-1] != a.shape[0]
    ):
        raise ShapeError(
            "lora_mixture_delta needs x [..., d_in], a [E, d_in, r], b [E, r, d_out], "
            f"gates [..., E]; got x {x.shape}, a {a.shape}, b {b.shape}, gates {gates.shape}"
        )
    h = jnp.einsum("...d,edr->...er", x, a)
    h = h * gates[..., None].astype(h.dtype)
    return jnp.einsum("...er,ero->...o", h, b) * scale
