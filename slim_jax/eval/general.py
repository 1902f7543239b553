"""General capability on the model's own domain: text the base model wrote, and how a fine-tuned
model still reads it.

With no held-out corpus of the pretraining domain at hand, the base model supplies one: stories
sampled from BOS with fixed seeds are in-domain by construction. On them we measure
- held-out likelihood: mean negative log-likelihood per token (and perplexity) under the model;
- agreement with the base model's next-token distribution at every position: top-1 agreement
  (same argmax) and KL(base || model) in nats per token.

The base model's distributions are computed once (`story_reference`) and kept on the host:
`tokens x vocab` float32 (16 MB for 32 stories of 256 tokens over a 512-token vocabulary), so
this suits small vocabularies; large models measure forgetting on benchmarks instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.data import CausalLayout, TokenizedExample
from slim_jax.errors import ConfigError
from slim_jax.eval.scoring import apply_model, ordered_batches, require_causal
from slim_jax.models.generate import generate
from slim_jax.tokenizer import Tokenizer

STORY_METRICS: tuple[str, ...] = ("nll", "perplexity", "top1_agreement", "kl_to_base")


def sample_stories(
    model: nnx.Module,
    tokenizer: Tokenizer,
    *,
    num_stories: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    min_tokens: int = 8,
) -> list[list[int]]:
    """Stories the model writes from BOS alone: token ids, each starting with BOS.

    Chunk `c` of `batch_size` stories samples with key `fold_in(key(seed), c)`, so the stories
    depend on the seed only (and, for a SLIM model with dynamic merging, on the state of its mask
    streams, which generation advances). A story ends at a stop token (not kept) or after
    `max_new_tokens`; stories shorter than `min_tokens` are dropped and replaced by further draws.

    Raises:
      ConfigError: a tokenizer without BOS, or settings that can never yield enough stories.
    """
    require_causal(model, "sample_stories")
    if tokenizer.bos_id is None:
        raise ConfigError("sampling stories from BOS needs a tokenizer with a BOS token")
    if num_stories < 1 or max_new_tokens < min_tokens:
        raise ConfigError(f"need num_stories >= 1 and max_new_tokens >= min_tokens ({min_tokens}),"
                          f" got {num_stories} and {max_new_tokens}")
    key = jax.random.key(seed)
    stories: list[list[int]] = []
    for chunk in range(100 * num_stories):
        if len(stories) >= num_stories:
            break
        out = generate(model, [[tokenizer.bos_id]] * batch_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       key=jax.random.fold_in(key, chunk), pad_id=tokenizer.pad_id)
        stories.extend([tokenizer.bos_id, *row] for row in out.tokens if len(row) >= min_tokens)
    if len(stories) < num_stories:
        raise ConfigError(f"the model wrote fewer than {num_stories} stories of at least "
                          f"{min_tokens} tokens; lower min_tokens")
    return stories[:num_stories]


@dataclasses.dataclass(frozen=True)
class StoryReference:
    """Stories as fixed-shape batches, with the base model's next-token log-probabilities.

    Attributes:
      batches: causal-LM batches, one story per row (`target_mask` covers every story token).
      log_probs: per batch, the base model's `[rows, seq, vocab]` float32 log-probabilities.
    """

    batches: tuple[dict[str, np.ndarray], ...]
    log_probs: tuple[np.ndarray, ...]


def _log_probs(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    return jax.nn.log_softmax(model.batch_logits(batch).astype(jnp.float32), axis=-1)


def story_reference(
    base: nnx.Module,
    tokenizer: Tokenizer,
    stories: list[list[int]],
    *,
    max_length: int,
    batch_size: int = 16,
) -> StoryReference:
    """Batch `stories` (cut to `max_length` positions) and record `base`'s distributions."""
    require_causal(base, "story_reference")
    layout = CausalLayout(tokenizer, lengths=(max_length,))
    examples = [layout.fit(TokenizedExample(np.asarray(s[:1], np.int32),
                                            np.asarray(s[1:], np.int32))) for s in stories]
    batches, log_probs = [], []
    for batch, _ in ordered_batches(examples, layout, batch_size):
        batches.append(batch)
        log_probs.append(np.asarray(apply_model(base, _log_probs, batch)))
    return StoryReference(tuple(batches), tuple(log_probs))


def _story_sums(model: nnx.Module, batch: dict[str, jax.Array],
                reference: jax.Array) -> dict[str, jax.Array]:
    """Sums over the batch's target tokens: NLL, top-1 agreements, KL(base || model), count."""
    log_probs = _log_probs(model, batch)
    mask = batch["target_mask"].astype(jnp.float32)
    target = jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    agree = (jnp.argmax(log_probs, -1) == jnp.argmax(reference, -1)).astype(jnp.float32)
    # KL(p_base || p) = sum_v p_base(v) (log p_base(v) - log p(v)) per position.
    kl = jnp.sum(jnp.exp(reference) * (reference - log_probs), axis=-1)
    counted = mask > 0  # where, not a product: padded rows must not leak a NaN into a sum
    return {"nll": -jnp.sum(jnp.where(counted, target, 0.0)),
            "agree": jnp.sum(jnp.where(counted, agree, 0.0)),
            "kl": jnp.sum(jnp.where(counted, kl, 0.0)), "count": jnp.sum(mask)}


def story_metrics(model: nnx.Module, reference: StoryReference) -> dict[str, float]:
    """General capability of `model` on the reference stories, per token.

    Returns:
      `nll` (mean negative log-likelihood, nats), `perplexity` (exp of it), `top1_agreement`
      (share of positions whose argmax is the base model's) and `kl_to_base` (mean
      KL(base || model), nats). For the base model itself: agreement 1, KL 0.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=8,
    ...                   intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> ref = story_reference(model, ByteTokenizer(), [[1, 70, 71, 72]], max_length=8)
    >>> m = story_metrics(model, ref)
    >>> m["top1_agreement"], m["kl_to_base"]
    (1.0, 0.0)
    """
    totals = {"nll": 0.0, "agree": 0.0, "kl": 0.0, "count": 0.0}
    for batch, log_probs in zip(reference.batches, reference.log_probs, strict=True):
        sums = apply_model(model, _story_sums, batch, log_probs)
        for name, value in jax.device_get(sums).items():
            totals[name] += float(value)
    count = max(totals["count"], 1.0)
    nll = totals["nll"] / count
    return {"nll": nll, "perplexity": float(np.exp(nll)), "top1_agreement": totals["agree"] / count,
            "kl_to_base": totals["kl"] / count}
