"""The training forward pass: logits of a batch, with SLIM's padding-aware cluster updates.

SLIM layers update their cluster statistics from the tokens they see (SLIM.md s2); padding must
not count. Before the forward pass every `SlimLinear` is handed the token mask of the tokens it
sees (`batch[key] != 0` for the segment-ids key the model family names, `model.mask_key(path)`):
for a causal LM all layers see `tokens`; in an encoder-decoder (T5) the encoder layers and the
decoder's cross-attention keys/values see the encoder tokens, every other decoder layer the
decoder tokens. The masks are cleared afterwards, so the model's state has the
same structure before and after a step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.nn import SlimLinear, adapted_layers, set_token_mask


def _exact(paths: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def token_mask_groups(
    model: nnx.Module, batch: Mapping[str, jax.Array]
) -> list[tuple[list[str], jax.Array]]:
    """`(SlimLinear paths, [batch, seq] mask)` pairs: which layers see which tokens.

    The model names, per layer path, the batch key of the segment ids its tokens carry
    (`mask_key`, `slim_jax.models.family.ModelFamily`); a model without `mask_key` (any NNX
    model that is no family) has every layer see `segment_ids`. Empty when the model has no
    `SlimLinear` or the batch lacks the keys.

    >>> from slim_jax.nn import SlimConfig
    >>> model = nnx.List([SlimLinear(4, 4, SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(0))])
    >>> [(paths, mask.tolist()) for paths, mask in
    ...  token_mask_groups(model, {"segment_ids": jnp.array([[1, 2, 0]])})]
    [(['0'], [[1.0, 1.0, 0.0]])]
    """
    slim = [p for p, m in adapted_layers(model).items() if isinstance(m, SlimLinear)]
    mask_key = getattr(model, "mask_key", lambda path: "segment_ids")
    groups: dict[str, list[str]] = {}
    for path in slim:
        groups.setdefault(mask_key(path), []).append(path)
    if not all(key in batch for key in groups):
        return []
    return [(paths, (batch[key] != 0).astype(jnp.float32)) for key, paths in groups.items()]


def masked_batch_logits(model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """`model.batch_logits(batch)` with padding masked out of SLIM's cluster updates.

    Args:
      model: a model implementing `batch_logits` (CONTRIBUTING.md), with or without adapters.
      batch: the standard batch dict.

    Returns:
      `[batch, seq_target, vocab]` logits.

    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> batch = {"tokens": jnp.zeros((2, 3), jnp.int32), "segment_ids": jnp.ones((2, 3))}
    >>> masked_batch_logits(Llama(cfg, rngs=nnx.Rngs(0)), batch).shape
    (2, 3, 16)
    """
    groups = token_mask_groups(model, batch)
    for paths, mask in groups:
        set_token_mask(model, mask, pattern=_exact(paths))
    try:
        return model.batch_logits(batch)
    finally:
        for paths, _ in groups:
            set_token_mask(model, None, pattern=_exact(paths))
