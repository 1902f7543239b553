"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling.

Shared by every generation loop (decoder-only and encoder-decoder), jit-friendly: all branches are
static Python values, so one compiled step serves a whole generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slim_jax.errors import ConfigError


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise `ConfigError` unless `temperature >= 0` and `0 < top_p <= 1`."""
    if not temperature >= 0.0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def next_token(
    logits: jax.Array, key: jax.Array | None, *, temperature: float = 0.0, top_p: float = 1.0
) -> jax.Array:
    """Pick one token per row.

    Args:
      logits: `[batch, vocab]` scores of the next token.
      key: PRNG key; unused (may be None) when `temperature == 0`.
      temperature: 0 for greedy (argmax), else logits are divided by it before sampling.
      top_p: nucleus sampling: sample only among the most likely tokens whose probabilities sum
        to at least `top_p` (the token that crosses the threshold is kept); 1 keeps all.

    Returns:
      `[batch]` int32 token ids.

    >>> import jax.numpy as jnp
    >>> next_token(jnp.array([[0.0, 2.0, 1.0]]), None).tolist()
    [1]
    """
    check_sampling(temperature, top_p)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ConfigError("sampling with temperature > 0 needs a PRNG key")
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Probability mass strictly before each sorted position: keep a token while that is < top_p.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
