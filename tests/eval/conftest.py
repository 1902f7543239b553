"""A tiny Llama over the byte tokenizer, shared by the evaluation tests."""

from __future__ import annotations

import pytest
from flax import nnx

from slim_jax.data import ByteTokenizer
from slim_jax.models.llama import Llama, LlamaConfig


def tiny_llama(seed: int = 0) -> Llama:
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=16,
                         intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         bos_id=ByteTokenizer.bos_id, eos_ids=(ByteTokenizer.eos_id,))
    return Llama(config, rngs=nnx.Rngs(seed))


@pytest.fixture
def llama() -> Llama:
    return tiny_llama()


@pytest.fixture(scope="session")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
