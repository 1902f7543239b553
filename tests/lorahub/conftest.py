"""Tiny models and random LoRA modules shared by the LoRAHub tests."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from slim_jax.data import ByteTokenizer, Example
from slim_jax.lorahub import LoRAModule
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.t5 import T5, T5Config

VOCAB = ByteTokenizer.vocab_size
LLAMA_TARGETS = ("self_attn/q_proj", "self_attn/v_proj")
T5_TARGETS = ("SelfAttention/q", "SelfAttention/v", "EncDecAttention/q", "EncDecAttention/v")


def tiny_llama(seed: int = 0, max_positions: int = 256) -> Llama:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=max_positions)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def tiny_t5(seed: int = 0) -> T5:
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                   num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, pad_token_id=0, eos_token_id=2,
                   decoder_start_token_id=0)
    return T5(cfg, rngs=nnx.Rngs(seed))


def target_layers(model: nnx.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """`{path: (d_in, d_out)}` of the model's linear layers whose path ends in a suffix."""
    out = {}
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(module, nnx.Linear) and name.endswith(suffixes):
            out[name] = (module.in_features, module.out_features)
    return dict(sorted(out.items()))


def random_modules(layers: dict[str, tuple[int, int]], n: int, *, rank: int = 2,
                   alpha: float = 4.0, scale: float = 0.5, seed: int = 0) -> list[LoRAModule]:
    """N modules with random (non-zero) A and B on `layers`."""
    rng = np.random.default_rng(seed)
    return [
        LoRAModule(f"m{i}", rank, alpha, {
            path: (scale * rng.standard_normal((d_in, rank)).astype(np.float32),
                   scale * rng.standard_normal((rank, d_out)).astype(np.float32))
            for path, (d_in, d_out) in layers.items()})
        for i in range(n)
    ]


def adapt_examples() -> list[Example]:
    """Five ADAPT examples of different lengths (the padding and pooling matter)."""
    return [Example("Q: 2+2?\nA:", " 4"), Example("Q: is the sky blue?\nA:", " yes"),
            Example("Q: a\nA:", " (B) no"), Example("Q: count: x x x\nA:", " 3"),
            Example("Q: longer question with words\nA:", " False")]


@pytest.fixture(scope="module")
def llama_setup():
    model = tiny_llama()
    return model, random_modules(target_layers(model, LLAMA_TARGETS), 4)


@pytest.fixture(scope="module")
def t5_setup():
    model = tiny_t5()
    return model, random_modules(target_layers(model, T5_TARGETS), 4)
