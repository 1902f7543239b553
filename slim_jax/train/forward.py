"""The training forward pass: logits of a batch, with SLIM's padding-aware cluster updates.

SLIM layers update their cluster statistics from the tokens they see (SLIM.md s2); padding must
not count. Before the forward pass every `SlimLinear` is handed the token mask of the tokens it
sees (`segment_ids != 0`): for a causal LM all layers see `tokens`; in an encoder-decoder the
encoder layers and the decoder's cross-attention keys/values see the encoder tokens, every other
decoder layer the decoder tokens. The masks are cleared afterwards, so the model's state has the
same structure before and after a step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.nn import SlimLinear, adapted_layers, set_token_mask

ENCODER_SIDE = re.compile(r"^encoder/|EncDecAttention/(k|v)$")
"""Paths of the layers that read encoder tokens (T5 naming, `slim_jax.models.t5`)."""


def _exact(paths: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"


def token_mask_groups(
    model: nnx.Module, batch: Mapping[str, jax.Array]
) -> list[tuple[list[str], jax.Array]]:
    """`(SlimLinear paths, [batch, seq] mask)` pairs: which layers see which tokens.

    Empty when the model has no `SlimLinear` or the batch has no segment ids.

    >>> from slim_jax.nn import SlimConfig
    >>> model = nnx.List([SlimLinear(4, 4, SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(0))])
    >>> [(paths, mask.tolist()) for paths, mask in
    ...  token_mask_groups(model, {"segment_ids": jnp.array([[1, 2, 0]])})]
    [(['0'], [[1.0, 1.0, 0.0]])]
    """
    slim = [p for p, m in adapted_layers(model).items() if isinstance(m, SlimLinear)]
    if not slim:
        return []
    if "enc_segment_ids" in batch and "dec_segment_ids" in batch:
        enc = [p for p in slim if ENCODER_SIDE.search(p)]
        dec = [p for p in slim if not ENCODER_SIDE.search(p)]
        groups = [(enc, batch["enc_segment_ids"]), (dec, batch["dec_segment_ids"])]
    elif "segment_ids" in batch:
        groups = [(slim, batch["segment_ids"])]
    else:
        return []
    return [(paths, (ids != 0).astype(jnp.float32)) for paths, ids in groups if paths]


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
