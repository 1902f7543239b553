"""Batched encoder-decoder generation for T5: encode once, then decode with cached keys/values.

The inputs are right-padded into a power-of-two bucket (rows too, `generate.pad_batch`), encoded
once; every decoder block's cross-attention keys and values are computed once
(`T5.init_decode_state`); decoding starts every row at the decoder start token (T5: the pad id)
and runs `generate.decode_loop` (greedy, temperature, top-p; a row stops at EOS) with a
static-shape self-attention cache. The whole generation is one jitted function: neither a new
token nor a new batch of the same bucket recompiles. As in `slim_jax.models.generate`, the
model's non-parameter state (SLIM mask streams) is carried through the encoder pass, the
cross-attention projections and every decoder step, and written back when the call returns, so
dynamic merging draws fresh masks on every forward pass (SLIM.md s3).

>>> from flax import nnx
>>> from slim_jax.models.t5 import T5, T5Config
>>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
...                num_heads=2)
>>> out = generate(T5(cfg, rngs=nnx.Rngs(0)), [[5, 7, 1], [3, 1]], max_new_tokens=4, stop_ids=())
>>> [len(row) for row in out.tokens]
[4, 4]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.functional import call_split, split_model
from slim_jax.models.generate import Generation, bucket_length, decode_loop, pad_batch, trim_at_stop
from slim_jax.models.sampling import check_sampling
from slim_jax.models.t5 import T5
from slim_jax.tokenizer import Tokenizer


def generate(
    model: T5,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    stop_ids: Sequence[int] | None = None,
    min_bucket: int = 16,
) -> Generation:
    """Answer a batch of encoder inputs: greedy by default, or temperature / nucleus sampling.

    The model's non-parameter state (e.g. SLIM mask streams) advances with every forward pass and
    is written back into `model`.

    Args:
      model: a `T5`, usually in inference mode (`model.eval()`).
      prompts: texts (encoded with `tokenizer`, EOS appended as T5's tokenizer does; "" gives the
        input `[EOS]`) or token id lists (used as given).
      tokenizer: encodes text prompts and decodes the results into `Generation.texts`.
      max_new_tokens: the most tokens generated per input.
      temperature: 0 for greedy; otherwise sampling at this temperature (needs `key`).
      top_p: nucleus sampling threshold (1 keeps every token).
      key: PRNG key for sampling.
      stop_ids: tokens that end a row; default the config's EOS. `()` always generates
        `max_new_tokens`.
      min_bucket: the smallest padded input length (lengths are padded to powers of two).

    Returns:
      `Generation`: the new token ids per input (cut before the stop token) and their texts.

    Raises:
      ConfigError: text prompts without a tokenizer, an empty token list, bad sampling
        settings, or `temperature > 0` without a key.
    """
    check_sampling(temperature, top_p)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and key is None:
        raise ConfigError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(s)")
    rows = _encode_inputs(prompts, tokenizer)
    config = model.config
    stop_ids = config.eos_ids if stop_ids is None else tuple(int(s) for s in stop_ids)
    length = bucket_length(max(len(row) for row in rows), minimum=min_bucket)
    batch = bucket_length(len(rows), minimum=1)
    tokens, segments = pad_batch(rows, length=length, pad_id=config.pad_token_id, side="right",
                                 batch=batch)
    graphdef, params, rest = split_model(model)
    out, rest = _generate_jit(
        graphdef, params, rest, jnp.asarray(tokens), jnp.asarray(segments),
        jax.random.key(0) if key is None else key,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
        stop_ids=stop_ids, pad_id=config.pad_token_id, start_id=config.decoder_start_token_id)
    nnx.update(model, rest)
    new_tokens = trim_at_stop(np.asarray(out)[: len(rows)], stop_ids)
    texts = None if tokenizer is None else [tokenizer.decode(row) for row in new_tokens]
    return Generation(tokens=new_tokens, texts=texts)


def _encode_inputs(prompts: Sequence[str] | Sequence[Sequence[int]],
                   tokenizer: Tokenizer | None) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ConfigError("prompts must be a list of inputs; wrap a single input as [prompt]")
    if not prompts:
        raise ConfigError("generate needs at least one input")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConfigError("text inputs need a tokenizer; pass tokenizer= or token ids")
            row = tokenizer.encode(prompt, add_eos=True)
        else:
            row = [int(t) for t in prompt]
        if not row:
            raise ConfigError(f"input {i} is an empty token list; T5 inputs end with EOS, "
                              "so even an empty text is [eos_id]")
        rows.append(row)
    return rows


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p",
                                             "stop_ids", "pad_id", "start_id"))
def _generate_jit(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    tokens: jax.Array,
    segments: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: tuple[int, ...],
    pad_id: int,
    start_id: int,
) -> tuple[jax.Array, nnx.State]:
    """Encode `tokens` [b, s_enc] once, then decode `max_new_tokens` [b, n]; one program per
    bucket. Returns the tokens and the model's `rest` after the last step."""
    start = jnp.full((tokens.shape[0], 1), start_id, jnp.int32)

    def first(model):
        encoded = model.encode(tokens, segments)
        # Cache positions: the start token at 0, generated tokens 1..n-1 (the n-th is never fed).
        cache = model.init_decode_state(encoded, segments != 0, max_new_tokens)
        return model.decode(start, cache)

    (logits, cache), rest = call_split(graphdef, params, rest, first)

    def step(carry, previous):
        cache, rest = carry
        (logits, cache), rest = call_split(graphdef, params, rest,
                                           lambda model: model.decode(previous[:, None], cache))
        return logits[:, 0], (cache, rest)

    out, (_, rest) = decode_loop(
        step, (cache, rest), logits[:, 0], key=key, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
    return out, rest
