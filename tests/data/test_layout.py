"""Tokenisation into the standard batch keys: the loss mask covers exactly the response and EOS."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slim_jax.data import (
    ByteTokenizer,
    CausalLayout,
    EncoderDecoderLayout,
    Example,
    PromptTemplate,
    tokenize_examples,
)
from slim_jax.errors import ConfigError, DataError

TOK = ByteTokenizer()
CAUSAL_KEYS = {"tokens", "positions", "segment_ids", "targets", "target_mask"}
ENCDEC_KEYS = {"enc_tokens", "enc_segment_ids", "dec_tokens", "dec_segment_ids", "targets",
               "target_mask"}
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=40, deadline=None)
@given(prompt=text.filter(bool), response=text)
def test_causal_mask_is_exactly_the_response_and_eos(prompt, response):
    layout = CausalLayout(TOK, lengths=(16, 128))
    [ex] = tokenize_examples([Example(prompt, response)], layout)
    batch = layout.build([[ex]], layout.bucket_for([[ex]]))
    assert set(batch) == CAUSAL_KEYS
    mask = batch["target_mask"][0] == 1.0
    expected = TOK.encode(response, add_eos=True)
    assert batch["targets"][0][mask].tolist() == expected
    # The scored positions are one contiguous run ending where the sequence ends.
    n = len(TOK.encode(prompt)) + 1 + len(expected) - 1
    assert mask.tolist() == [False] * (n - len(expected)) + [True] * len(expected) + \
        [False] * (batch["tokens"].shape[1] - n)
    seq = [TOK.bos_id, *TOK.encode(prompt), *expected]
    assert batch["tokens"][0, :n].tolist() == seq[:-1]
    assert batch["targets"][0, :n].tolist() == seq[1:]


@settings(max_examples=40, deadline=None)
@given(prompt=text, response=text)
def test_encdec_mask_and_teacher_forcing(prompt, response):
    layout = EncoderDecoderLayout(TOK, enc_lengths=(8, 96), dec_lengths=(8, 96))
    [ex] = tokenize_examples([Example(prompt, response)], layout)
    batch = layout.build([[ex]], layout.bucket_for([[ex]]))
    assert set(batch) == ENCDEC_KEYS
    expected = TOK.encode(response, add_eos=True)
    mask = batch["target_mask"][0] == 1.0
    assert batch["targets"][0][mask].tolist() == expected
    assert mask.sum() == len(expected) and mask[:len(expected)].all()
    # Decoder input: the start token (pad, as T5) then the targets shifted right.
    assert batch["dec_tokens"][0, :len(expected)].tolist() == [TOK.pad_id, *expected[:-1]]
    enc = TOK.encode(prompt, add_eos=True)
    assert batch["enc_tokens"][0, :len(enc)].tolist() == enc
    assert (batch["enc_segment_ids"][0] == 1).sum() == len(enc)


def test_causal_padding_and_dtypes():
    layout = CausalLayout(TOK, lengths=32)
    [ex] = tokenize_examples([Example("ab", "c")], layout)
    batch = layout.build([[ex], []], (32,))
    assert batch["tokens"].dtype == np.int32 and batch["target_mask"].dtype == np.float32
    # 4 positions used: [BOS] a b c -> a b c [EOS]
    assert batch["segment_ids"][0].tolist() == [1] * 4 + [0] * 28
    assert batch["positions"][0, :4].tolist() == [0, 1, 2, 3]
    assert (batch["segment_ids"][1] == 0).all() and batch["target_mask"][1].sum() == 0
    assert (batch["tokens"][0, 4:] == TOK.pad_id).all()


def test_template_applies_before_tokenisation():
    layout = CausalLayout(TOK, lengths=64)
    template = PromptTemplate(prompt="Q: {instruction}\nA:", response=" {response}")
    [ex] = tokenize_examples([Example("2+2?", "4")], layout, template)
    assert TOK.decode(ex.prompt) == "Q: 2+2?\nA:" and TOK.decode(ex.response) == " 4"


def test_causal_truncation_keeps_prompt_end_and_whole_response():
    layout = CausalLayout(TOK, lengths=(8, 16))
    [ex] = tokenize_examples([Example("0123456789abcdefghij", "xyz")], layout)
    assert layout.size(ex) == (16,)
    assert ex.prompt[0] == TOK.bos_id                 # BOS stays in front
    # 16 positions = 17 tokens: 4 of the response (xyz, EOS), BOS and the last 12 of the prompt.
    assert TOK.decode(ex.prompt) == "89abcdefghij"
    assert TOK.decode(ex.response) == "xyz" and ex.response[-1] == TOK.eos_id


def test_causal_truncation_of_an_overlong_response_keeps_its_start():
    layout = CausalLayout(TOK, lengths=8)
    [ex] = tokenize_examples([Example("question", "a long answer")], layout)
    assert layout.size(ex) == (8,)
    assert ex.prompt.tolist() == [TOK.bos_id]
    assert TOK.decode(ex.response) == "a long a"


def test_encdec_truncation():
    layout = EncoderDecoderLayout(TOK, enc_lengths=6, dec_lengths=4)
    [ex] = tokenize_examples([Example("0123456789", "abcdef")], layout)
    assert TOK.decode(ex.prompt) == "56789" and ex.prompt[-1] == TOK.eos_id
    assert TOK.decode(ex.response) == "abcd"


def test_empty_prompt_without_bos_is_refused():
    layout = CausalLayout(TOK, lengths=16, add_bos=False)
    with pytest.raises(DataError, match="empty prompt"):
        layout.encode("", "story")


@pytest.mark.parametrize("lengths", [0, (), (16, -1), (8.5,)])
def test_bad_lengths(lengths):
    with pytest.raises(ConfigError, match="lengths must be positive ints"):
        CausalLayout(TOK, lengths=lengths)
