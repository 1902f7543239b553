"""Greedy answers of a base or composed model to text prompts, for BBH scoring (LORAHUB.md s5).

Greedy decoding up to `max_new_tokens` (256 in the reference), stopping at EOS, decoded without
special tokens. Encoder-decoder models read `prompt [EOS]` (at most `max_length` tokens, the end
kept); decoder-only models read `[BOS] prompt`, and a prompt longer than
`max_position_embeddings - max_new_tokens` loses tokens from its start (BOS kept), so that prompt
and answer fit the model's positions (the TinyStories model has 512: prompts keep their last 255
tokens after BOS). Prompts are decoded in length-sorted chunks of `batch_size`, so each chunk
pads little and reuses one compiled program per shape bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from slim_jax.data.layout import keep_end
from slim_jax.errors import ConfigError
from slim_jax.lorahub.objective import MAX_LENGTH
from slim_jax.models.generate import generate
from slim_jax.tokenizer import Tokenizer


def prompt_ids(model: nnx.Module, tokenizer: Tokenizer, prompt: str, *,
               max_new_tokens: int, max_length: int = MAX_LENGTH) -> list[int]:
    """The token ids `model` is given for `prompt`, truncated as the module docstring says.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, max_position_embeddings=8)
    >>> prompt_ids(Llama(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), "abcdef", max_new_tokens=4)
    [1, 103, 104, 105]
    """
    ids = np.asarray(model.encode_prompt(tokenizer, prompt), np.int32)  # family.ModelFamily
    if model.layout == "encoder_decoder":
        return keep_end(ids, max_length, keep_first=False).tolist()
    positions = getattr(model.config, "max_position_embeddings", max_length)
    limit = min(max_length, positions - max_new_tokens)
    if limit < 2:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves {limit} of the model's "
                          f"{positions} positions for the prompt; lower max_new_tokens")
    return keep_end(ids, limit, keep_first=tokenizer.bos_id is not None).tolist()


def greedy_answers(
    model: nnx.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts`, in order, as text without special tokens.

    Args:
      model: any model family (`Llama`, `T5`; base, or a composition from
        `AttachedLibrary.merged_model`).
      tokenizer: the model's tokenizer.
      prompts: the texts to answer.
      max_new_tokens: the most tokens generated per prompt (stops earlier at EOS).
      batch_size: prompts decoded together.
      max_length: the longest encoder input (encoder-decoder) or prompt (decoder-only).
      progress: show a progress bar over chunks.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> answers = greedy_answers(Llama(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), ["Q: 1+1?\\nA:"],
    ...                          max_new_tokens=3)
    >>> len(answers), type(answers[0]).__name__
    (1, 'str')
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} "
                          f"and {batch_size}")
    rows = [prompt_ids(model, tokenizer, p, max_new_tokens=max_new_tokens, max_length=max_length)
            for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    answers: list[str] = [""] * len(rows)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="generate", leave=False, disable=not progress):
        out = generate(model, [rows[i] for i in chunk], max_new_tokens=max_new_tokens)
        for i, tokens in zip(chunk, out.tokens, strict=True):
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers
