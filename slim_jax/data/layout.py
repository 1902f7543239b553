"""Tokenised examples and the batch layouts of CONTRIBUTING.md: causal LM and encoder-decoder.

A layout knows one model family's conventions: how (prompt, response) text becomes token ids, how an
over-long example is truncated, how many positions it takes, and how rows of (possibly packed)
examples become the standard batch arrays. The loss covers the response tokens and the EOS after
them, never the prompt.

Causal LM (`CausalLayout`): an example is the sequence `seq = [BOS] prompt response [EOS]`, and a
row holds `tokens = seq[:-1]`, `targets = seq[1:]` (next-token targets), so it takes `len(seq) - 1`
positions; `target_mask` is 1 exactly where the target is a response token or its EOS. Packed
examples get segment ids 1, 2, ... and positions restarting at 0; segment 0 is padding.

Encoder-decoder (`EncoderDecoderLayout`, T5): the encoder reads `prompt [EOS]`, the decoder reads
`[start] response` (start = pad, as T5) and predicts `response [EOS]`, all of it scored. A packed
example has the same segment id in the encoder and the decoder rows; the model must restrict
cross-attention to equal segment ids.

Truncation (to the largest configured length): the response is kept whole when it fits (else its
start is kept, losing the EOS); the prompt keeps its end, where the question meets the answer,
dropping tokens from its start (a causal BOS stays in front).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from slim_jax.data.examples import PLAIN, Example, PromptTemplate
from slim_jax.data.packing import Size, bucket_length, check_lengths, row_fill
from slim_jax.errors import DataError
from slim_jax.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class TokenizedExample:
    """Token ids of one example.

    Attributes:
      prompt: `[p]` int32, the conditioning part (causal: with BOS; encoder-decoder: with EOS).
      response: `[r]` int32, the part the loss covers, ending in EOS (unless truncated).
    """

    prompt: np.ndarray
    response: np.ndarray


class Layout(Protocol):
    """What the batch iterator needs from a layout."""

    lengths: tuple[tuple[int, ...], ...]  # configured row lengths per dimension, ascending

    @property
    def capacity(self) -> Size: ...

    def encode(self, prompt: str, response: str) -> TokenizedExample: ...

    def fit(self, example: TokenizedExample) -> TokenizedExample: ...

    def size(self, example: TokenizedExample) -> Size: ...

    def bucket_for(self, rows: Sequence[Sequence[TokenizedExample]]) -> Size: ...

    def build(self, rows: Sequence[Sequence[TokenizedExample]], shape: Size) -> Batch: ...


def keep_end(ids: np.ndarray, n: int, *, keep_first: bool) -> np.ndarray:
    """The last `n` ids of `ids`; with `keep_first`, its first id (BOS) stays in front.

    >>> keep_end(np.array([1, 5, 6, 7]), 3, keep_first=True).tolist()
    [1, 6, 7]
    """
    if len(ids) <= n:
        return ids
    if keep_first:
        return np.concatenate([ids[:1], ids[len(ids) - n + 1:]]) if n > 1 else ids[:1]
    return ids[len(ids) - n:]


def bucket_shape(fills: Sequence[Size], lengths: Sequence[tuple[int, ...]]) -> Size:
    """Row lengths of a batch: per dimension, the smallest configured length holding every row."""
    return tuple(bucket_length(max(f[d] for f in fills), lengths[d]) for d in range(len(lengths)))


def _ids(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


class CausalLayout:
    """Rows for decoder-only models: `tokens, positions, segment_ids, targets, target_mask`.

    Args:
      tokenizer: any `slim_jax.tokenizer.Tokenizer`.
      lengths: row lengths a batch may have (bucketing: a batch takes the smallest that holds its
        longest row, so jit compiles one shape per length); the largest is the truncation limit.
      add_bos: put BOS in front of the prompt (when the tokenizer has one).

    >>> from slim_jax.data.byte_tokenizer import ByteTokenizer
    >>> layout = CausalLayout(ByteTokenizer(), lengths=(8, 16))
    >>> ex = layout.encode("Q:", "ok")              # [BOS] Q : | o k [EOS]
    >>> batch = layout.build([[ex]], layout.bucket_for([[ex]]))
    >>> batch["tokens"].shape, batch["target_mask"][0, :6].tolist()
    ((1, 8), [0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    """

    def __init__(self, tokenizer: Tokenizer, lengths: int | Sequence[int] = 512, *,
                 add_bos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.lengths = (check_lengths(lengths, "lengths"),)
        self.add_bos = add_bos and tokenizer.bos_id is not None

    @property
    def capacity(self) -> Size:
        return (self.lengths[0][-1],)

    def encode(self, prompt: str, response: str) -> TokenizedExample:
        """Ids of `[BOS] prompt` and `response [EOS]`, encoded apart so the boundary is exact."""
        p = _ids(self.tokenizer.encode(prompt, add_bos=self.add_bos))
        r = _ids(self.tokenizer.encode(response, add_eos=True))
        if len(p) == 0:
            raise DataError(f"empty prompt {prompt!r} without BOS: the first response token "
                            "would have nothing to be predicted from; give a prompt or a tokenizer "
                            "with BOS")
        return TokenizedExample(p, r)

    def fit(self, example: TokenizedExample) -> TokenizedExample:
        """Truncate to `capacity` positions (`len(prompt) + len(response) - 1`), module policy."""
        limit = self.capacity[0]
        response = example.response[:limit]  # leaves at least one prompt token
        prompt = keep_end(example.prompt, limit + 1 - len(response), keep_first=self.add_bos)
        return TokenizedExample(prompt, response)

    def size(self, example: TokenizedExample) -> Size:
        return (len(example.prompt) + len(example.response) - 1,)

    def bucket_for(self, rows: Sequence[Sequence[TokenizedExample]]) -> Size:
        """Row shape for these rows: the smallest configured length holding the fullest row."""
        fills = [row_fill((self.size(e) for e in row), 1) for row in rows]
        return bucket_shape(fills, self.lengths)

    def build(self, rows: Sequence[Sequence[TokenizedExample]], shape: Size) -> Batch:
        """Batch arrays `[len(rows), shape[0]]`: int32 ids and float32 `target_mask`."""
        (length,) = shape
        n = len(rows)
        pad = self.tokenizer.pad_id
        tokens = np.full((n, length), pad, np.int32)
        targets = np.full((n, length), pad, np.int32)
        positions = np.zeros((n, length), np.int32)
        segment_ids = np.zeros((n, length), np.int32)
        target_mask = np.zeros((n, length), np.float32)
        for i, row in enumerate(rows):
            start = 0
            for segment, ex in enumerate(row, start=1):
                seq = np.concatenate([ex.prompt, ex.response])
                end = start + len(seq) - 1
                if end > length:
                    raise DataError(f"row {i} needs {end} positions, more than its length {length}")
                tokens[i, start:end] = seq[:-1]
                targets[i, start:end] = seq[1:]
                positions[i, start:end] = np.arange(end - start)
                segment_ids[i, start:end] = segment
                # targets[t] = seq[t + 1] is a response token (or its EOS) iff t + 1 >= len(prompt).
                target_mask[i, start + len(ex.prompt) - 1:end] = 1.0
                start = end
        return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
                "targets": targets, "target_mask": target_mask}


class EncoderDecoderLayout:
    """Rows for encoder-decoder models (T5): `enc_tokens, enc_segment_ids, dec_tokens,
    dec_segment_ids, targets, target_mask`.

    Args:
      tokenizer: any `slim_jax.tokenizer.Tokenizer`.
      enc_lengths: encoder row lengths (bucketing as in `CausalLayout`); the largest is the limit.
      dec_lengths: decoder row lengths, likewise.
      decoder_start_id: first decoder input of every example; None means `pad_id`, as T5.

    >>> from slim_jax.data.byte_tokenizer import ByteTokenizer
    >>> layout = EncoderDecoderLayout(ByteTokenizer(), enc_lengths=8, dec_lengths=4)
    >>> ex = layout.encode("Q", "ok")                # enc: Q [EOS]; dec: [pad] o k -> o k [EOS]
    >>> batch = layout.build([[ex]], layout.bucket_for([[ex]]))
    >>> batch["dec_tokens"][0].tolist(), batch["targets"][0].tolist()
    ([0, 114, 110, 0], [114, 110, 2, 0])
    """

    def __init__(self, tokenizer: Tokenizer, enc_lengths: int | Sequence[int] = 512,
                 dec_lengths: int | Sequence[int] = 128, *,
                 decoder_start_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.lengths = (check_lengths(enc_lengths, "enc_lengths"),
                        check_lengths(dec_lengths, "dec_lengths"))
        self.decoder_start_id = tokenizer.pad_id if decoder_start_id is None else decoder_start_id

    @property
    def capacity(self) -> Size:
        return (self.lengths[0][-1], self.lengths[1][-1])

    def encode(self, prompt: str, response: str) -> TokenizedExample:
        """Token ids of `prompt [EOS]` (encoder) and `response [EOS]` (decoder targets)."""
        return TokenizedExample(_ids(self.tokenizer.encode(prompt, add_eos=True)),
                                _ids(self.tokenizer.encode(response, add_eos=True)))

    def fit(self, example: TokenizedExample) -> TokenizedExample:
        """Keep the end of the encoder input (with its EOS) and the start of the response."""
        enc_limit, dec_limit = self.capacity
        return TokenizedExample(keep_end(example.prompt, enc_limit, keep_first=False),
                                example.response[:dec_limit])

    def size(self, example: TokenizedExample) -> Size:
        return (len(example.prompt), len(example.response))

    def bucket_for(self, rows: Sequence[Sequence[TokenizedExample]]) -> Size:
        """Row shape `(enc, dec)` for these rows, per dimension the smallest configured length."""
        fills = [row_fill((self.size(e) for e in row), 2) for row in rows]
        return bucket_shape(fills, self.lengths)

    def build(self, rows: Sequence[Sequence[TokenizedExample]], shape: Size) -> Batch:
        """Batch arrays `[len(rows), enc]` and `[len(rows), dec]`."""
        enc_len, dec_len = shape
        n = len(rows)
        pad = self.tokenizer.pad_id
        enc_tokens = np.full((n, enc_len), pad, np.int32)
        enc_segment_ids = np.zeros((n, enc_len), np.int32)
        dec_tokens = np.full((n, dec_len), pad, np.int32)
        dec_segment_ids = np.zeros((n, dec_len), np.int32)
        targets = np.full((n, dec_len), pad, np.int32)
        target_mask = np.zeros((n, dec_len), np.float32)
        for i, row in enumerate(rows):
            e0 = d0 = 0
            for segment, ex in enumerate(row, start=1):
                e1, d1 = e0 + len(ex.prompt), d0 + len(ex.response)
                if e1 > enc_len or d1 > dec_len:
                    raise DataError(f"row {i} needs ({e1}, {d1}) positions, more than {shape}")
                enc_tokens[i, e0:e1] = ex.prompt
                enc_segment_ids[i, e0:e1] = segment
                # Teacher forcing: decoder input is the target shifted right behind the start token.
                dec_tokens[i, d0] = self.decoder_start_id
                dec_tokens[i, d0 + 1:d1] = ex.response[:-1]
                dec_segment_ids[i, d0:d1] = segment
                targets[i, d0:d1] = ex.response
                target_mask[i, d0:d1] = 1.0
                e0, d0 = e1, d1
        return {"enc_tokens": enc_tokens, "enc_segment_ids": enc_segment_ids,
                "dec_tokens": dec_tokens, "dec_segment_ids": dec_segment_ids,
                "targets": targets, "target_mask": target_mask}


def tokenize_examples(
    examples: Sequence[Example], layout: Layout, template: PromptTemplate = PLAIN
) -> list[TokenizedExample]:
    """Render each example with `template`, encode it for `layout`, and truncate it to fit.

    >>> from slim_jax.data.byte_tokenizer import ByteTokenizer
    >>> [ex] = tokenize_examples([Example("Hi", "yo")], CausalLayout(ByteTokenizer(), 16))
    >>> ex.prompt.tolist(), ex.response.tolist()
    ([1, 75, 108], [124, 114, 2])
    """
    return [layout.fit(layout.encode(*template.render(e))) for e in examples]
