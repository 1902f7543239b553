"""The training loss: cross-entropy over target tokens (the SLIM L1 term is added by the step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def target_cross_entropy(
    logits: jax.Array, targets: jax.Array, target_mask: jax.Array
) -> jax.Array:
    """Summed cross-entropy of the target tokens, `sum_t mask_t * -log softmax(logits_t)[y_t]`.

    The sum (not the mean) is returned so that micro-batches and data shards add up exactly; the
    step divides by the global number of target tokens.

    Args:
      logits: `[batch, seq, vocab]` scores (any float dtype; computed in float32).
      targets: `[batch, seq]` int target ids.
      target_mask: `[batch, seq]`, 1.0 where the loss counts (response tokens), 0 elsewhere.

    Returns:
      `[]` float32.

    >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    >>> round(float(target_cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))), 4)
    0.6931
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * target_mask.astype(jnp.float32))
