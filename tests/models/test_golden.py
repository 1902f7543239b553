"""Refactoring keeps behaviour: greedy generations equal a golden file made on the old code.

`golden/generation.json` was written before the model-family refactor (commit dca1ba6, with the
then separate `models.generate` and `models.t5_generate`): greedy continuations of stories260K
(llama2.c) and of the tiny random Hugging Face checkpoints that `test_llama.py` and `test_t5.py`
build (seeded, so rebuilt identically here). The one `generate` must reproduce every token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slim_jax.models.generate import generate
from slim_jax.models.llama import Llama
from slim_jax.models.llama2c import load_llama2c
from slim_jax.models.t5 import T5

GOLDEN = json.loads((Path(__file__).parent / "golden" / "generation.json").read_text())
LLAMA_KINDS = [k.removeprefix("llama_") for k in GOLDEN if k.startswith("llama_")]


def test_stories260k_greedy_texts_unchanged(shared_data):
    folder = shared_data / "tinystories260k"
    model, tokenizer = load_llama2c(folder / "checkpoint_v1.bin", folder / "tokenizer.bin")
    want = GOLDEN["stories260k"]
    got = generate(model, want["prompts"], tokenizer=tokenizer,
                   max_new_tokens=want["max_new_tokens"])
    assert got.tokens == want["tokens"]
    assert got.texts == want["texts"]


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_llama_parity_checkpoints_greedy_tokens_unchanged(kind, tmp_path, sibling):
    sibling("test_llama")._save_tiny(tmp_path, kind)
    want = GOLDEN[f"llama_{kind}"]
    got = generate(Llama.from_pretrained(tmp_path), want["prompts"],
                   max_new_tokens=want["max_new_tokens"], stop_ids=())
    assert got.tokens == want["tokens"]


def test_t5_parity_checkpoint_greedy_tokens_unchanged(tmp_path, sibling):
    sibling("test_t5")._save_tiny_t5(tmp_path)
    want = GOLDEN["t5"]
    got = generate(T5.from_pretrained(tmp_path), want["prompts"],
                   max_new_tokens=want["max_new_tokens"], stop_ids=())
    assert got.tokens == want["tokens"]
