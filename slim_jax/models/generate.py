"""Batched generation for every model family, compiled once per shape bucket.

`generate` drives any model that implements `slim_jax.models.family.ModelFamily` (`Llama`, `T5`, a
new family): prompts are encoded by the family (`encode_prompt`), padded on the family's
`prompt_side` to a power-of-two bucket (rows too), run in one call (`prefill`: a decoder-only model
fills its KV cache; an encoder-decoder encodes once and computes its cross-attention keys and
values), and one `jax.lax.while_loop` picks and feeds tokens (`decode_step`) until every row has
stopped or `max_new_tokens` are written. The whole generation is one jitted function, so neither a
new token nor a new batch of the same bucket recompiles.

The model runs as a pure function (`slim_jax.models.functional`): its parameters are inputs, and
the rest of its state (RNG streams, SLIM cluster statistics) is carried through the prefill and
every loop step and written back when the call returns. A SLIM layer with dynamic merging thus
draws fresh channel masks on every forward pass, the prefill and each new token alike (SLIM.md s3),
and its stream advances deterministically: the same stream state and inputs give the same text
(`nnx.reseed(model, slim=seed)` to repeat a generation). Generate in inference mode
(`slim_jax.nn.inference_view`): a model in training mode updates its cluster statistics from the
padded prompts and the generated tokens, and keeps those updates.

Building blocks: `bucket_length(n)` (the static length a size is padded to), `pad_batch` (ragged
id lists -> tokens + segment ids), `decode_loop` (the jit-friendly sampling loop with per-row
stopping), `trim_at_stop` (cut each row before its first stop token), `Generation` (the result).

>>> from flax import nnx
>>> from slim_jax.models.llama import Llama, LlamaConfig
>>> from slim_jax.models.t5 import T5, T5Config
>>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
...                   num_heads=2, num_kv_heads=1)
>>> out = generate(Llama(cfg, rngs=nnx.Rngs(0)), [[1, 5, 7], [1]], max_new_tokens=4,
...                stop_ids=())
>>> [len(row) for row in out.tokens]
[4, 4]
>>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
...                num_heads=2)
>>> out = generate(T5(cfg, rngs=nnx.Rngs(0)), [[5, 7, 1], [3, 1]], max_new_tokens=4, stop_ids=())
>>> [len(row) for row in out.tokens]
[4, 4]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.family import ModelFamily
from slim_jax.models.functional import call_split, split_model
from slim_jax.models.sampling import check_sampling, next_token
from slim_jax.tokenizer import Tokenizer

Carry = Any


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated continuations.

    Attributes:
      tokens: per prompt, the new token ids, cut before the first stop token.
      texts: per prompt, the decoded text of `tokens` (None when no tokenizer was given).
    """

    tokens: list[list[int]]
    texts: list[str] | None


def bucket_length(n: int, *, minimum: int = 16) -> int:
    """The static size that `n` is padded to: the next power of two, at least `minimum`.

    Sizes in the same bucket share one compiled program.

    >>> [bucket_length(n, minimum=4) for n in (1, 4, 5, 17)]
    [4, 4, 8, 32]
    """
    if n < 0 or minimum < 1:
        raise ConfigError(f"bucket_length needs n >= 0 and minimum >= 1, got {n} and {minimum}")
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def pad_batch(
    rows: Sequence[Sequence[int]],
    *,
    length: int,
    pad_id: int,
    side: Literal["left", "right"] = "left",
    batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad ragged token rows into `[batch, length]` int32 tokens and segment ids (1 real, 0 pad).

    Args:
      rows: token ids per row, each at most `length` long.
      length: the padded length (usually `bucket_length` of the longest row).
      pad_id: the id put in padded slots (never attended to: its segment is 0).
      side: "left" for decoder prompts (every prompt then ends in the same slot, where generation
        continues), "right" for encoder inputs and training batches.
      batch: pad with all-padding rows up to this many rows (default `len(rows)`).

    >>> tokens, segments = pad_batch([[5, 6], [7]], length=3, pad_id=0)
    >>> tokens.tolist(), segments.tolist()
    ([[0, 5, 6], [0, 0, 7]], [[0, 1, 1], [0, 0, 1]])
    """
    batch = len(rows) if batch is None else batch
    if batch < len(rows):
        raise ConfigError(f"pad_batch: batch={batch} is smaller than the {len(rows)} rows given")
    if side not in ("left", "right"):
        raise ConfigError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    tokens = np.full((batch, length), pad_id, np.int32)
    segments = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ConfigError(f"row {i} has {len(row)} tokens, more than the padded length "
                              f"{length}")
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        tokens[i, span] = row
        segments[i, span] = 1
    return tokens, segments


def decode_loop(
    step: Callable[[Carry, jax.Array], tuple[jax.Array, Carry]],
    carry: Carry,
    logits: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[jax.Array, Carry]:
    """Sample up to `max_new_tokens` tokens per row; traceable, meant to run inside `jax.jit`.

    Token t is chosen from the current logits (`sampling.next_token`, key `fold_in(key, t)`); a
    row that has emitted a stop id is done and gets `pad_id` from then on; the loop ends when every
    row is done, so no model step is spent after that.

    Args:
      step: `(carry, tokens [b]) -> (logits [b, vocab], carry)`: feeds the chosen tokens to the
        model (e.g. one cached decoder step). The carry out must have the structure, shapes and
        dtypes of the carry in.
      carry: the state `step` threads (KV cache, positions, the model's RNG streams, ...).
      logits: `[b, vocab]` scores of the first new token (from the prefill).
      key: PRNG key (ignored when `temperature == 0`).
      max_new_tokens, temperature, top_p: static generation settings.
      stop_ids: static token ids that end a row (it is kept in the output; `trim_at_stop` cuts).
      pad_id: written after a row has stopped.

    Returns:
      `(tokens [b, max_new_tokens] int32, carry)`: the carry after the last step run (`step`
      runs once per token after the first, fewer times when every row stops early).
    """
    stops = jnp.asarray(stop_ids, jnp.int32)

    def choose(logits: jax.Array, t: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        token = next_token(logits, jax.random.fold_in(key, t), temperature=temperature,
                           top_p=top_p)
        token = jnp.where(done, pad_id, token)
        return token, done | jnp.isin(token, stops)

    first, done = choose(logits, jnp.int32(0), jnp.zeros(logits.shape[0], bool))
    out = jnp.full((logits.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        t, _, _, _, done = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, carry, previous, out, done = state
        logits, carry = step(carry, previous)
        token, done = choose(logits, t, done)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, t))
        return t + 1, carry, token, out, done

    _, carry, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), carry, first, out, done))
    return out, carry


def trim_at_stop(tokens: np.ndarray, stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row of `[b, n]` generated tokens, cut before its first stop id.

    >>> trim_at_stop(np.array([[4, 2, 0], [5, 6, 7]]), (2,))
    [[4], [5, 6, 7]]
    """
    rows = []
    for row in np.asarray(tokens).tolist():
        cut = next((i for i, tok in enumerate(row) if tok in stop_ids), len(row))
        rows.append(row[:cut])
    return rows


def generate(
    model: ModelFamily,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    stop_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    min_bucket: int = 16,
) -> Generation:
    """Continue (or answer) a batch of prompts: greedy by default, or temperature / nucleus
    sampling.

    Every forward pass (the prefill, then one per new token) may update the model's non-parameter
    state, e.g. advance a SLIM layer's mask stream; the updated state is written back into `model`.

    Args:
      model: any `ModelFamily` (`Llama`, `T5`, ...), usually in inference mode.
      prompts: texts (encoded by the family with `tokenizer`: BOS in front for a decoder, EOS
        behind for T5's encoder; "" starts from BOS, or is T5's `[EOS]`) or token id lists (used
        as given).
      tokenizer: encodes text prompts and decodes the results into `Generation.texts`.
      max_new_tokens: the most tokens generated per prompt.
      temperature: 0 for greedy; otherwise sampling at this temperature (needs `key`).
      top_p: nucleus sampling threshold (1 keeps every token).
      key: PRNG key for sampling.
      stop_ids: tokens that end a row; default the model config's `eos_ids`, else the tokenizer's
        EOS. Use `()` to always generate `max_new_tokens`.
      pad_id: id for padded slots; default the tokenizer's, else the config's, else 0.
      min_bucket: smallest padded prompt length (lengths are padded to powers of two).

    Returns:
      `Generation` with the new token ids per prompt (stop token excluded) and their texts.

    Raises:
      ConfigError: text prompts without a tokenizer, an empty prompt (no BOS to start from),
        bad sampling settings, or `temperature > 0` without a key.
    """
    check_sampling(temperature, top_p)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and key is None:
        raise ConfigError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(s)")
    rows = _encode_prompts(model, prompts, tokenizer)
    config = model.config
    if stop_ids is None:
        stop_ids = getattr(config, "eos_ids", None) or (
            () if tokenizer is None else (tokenizer.eos_id,))
    if pad_id is None:
        pad_id = (tokenizer.pad_id if tokenizer is not None
                  else getattr(config, "pad_id", None)) or 0
    length = bucket_length(max(len(row) for row in rows), minimum=min_bucket)
    batch = bucket_length(len(rows), minimum=1)
    tokens, segments = pad_batch(rows, length=length, pad_id=pad_id, side=model.prompt_side,
                                 batch=batch)
    graphdef, params, rest = split_model(model)
    settings = (("max_new_tokens", max_new_tokens), ("temperature", float(temperature)),
                ("top_p", float(top_p)), ("stop_ids", tuple(int(s) for s in stop_ids)),
                ("pad_id", int(pad_id)))
    out, rest = generation_program(graphdef, params, rest, jnp.asarray(tokens),
                                   jnp.asarray(segments),
                                   jax.random.key(0) if key is None else key, settings=settings)
    nnx.update(model, rest)
    new_tokens = trim_at_stop(np.asarray(out)[: len(rows)], tuple(stop_ids))
    texts = None if tokenizer is None else [tokenizer.decode(row) for row in new_tokens]
    return Generation(tokens=new_tokens, texts=texts)


def _encode_prompts(
    model: ModelFamily, prompts: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Tokenizer | None,
) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ConfigError("prompts must be a list of prompts; wrap a single prompt as [prompt]")
    if not prompts:
        raise ConfigError("generate needs at least one prompt")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConfigError("text prompts need a tokenizer; pass tokenizer= or token ids")
            row = model.encode_prompt(tokenizer, prompt)
        else:
            row = [int(t) for t in prompt]
        if not row:
            raise ConfigError(f"prompt {i} is empty and there is no BOS token to start from: "
                              "give at least one token (an empty token list cannot start)")
        rows.append(row)
    return rows


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def generation_program(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                       tokens: jax.Array, segments: jax.Array, key: jax.Array, *,
                       settings: tuple[tuple[str, Any], ...]) -> tuple[jax.Array, nnx.State]:
    """`prefill` the padded prompts `[b, p]`, then `decode_loop` over `decode_step`; one program
    per bucket and `settings` (the static keyword arguments of `decode_loop` as sorted pairs).
    Returns the new tokens `[b, max_new_tokens]` and the model's `rest` after the last step."""
    max_new_tokens = dict(settings)["max_new_tokens"]
    (logits, state), rest = call_split(
        graphdef, params, rest, lambda model: model.prefill(tokens, segments, max_new_tokens))

    def step(carry, previous):
        state, rest = carry
        (logits, state), rest = call_split(graphdef, params, rest,
                                           lambda model: model.decode_step(previous, state))
        return logits, (state, rest)

    out, (_, rest) = decode_loop(step, (state, rest), logits, key=key, **dict(settings))
    return out, rest
