"""SLIM dynamic merging inside jitted generation (Llama and T5): the model's RNG streams are
threaded through the decoding loop, so every forward pass draws fresh masks (SLIM.md s3), the
streams advance deterministically, and one program serves every call of a bucket."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.models import generate as gen
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.t5 import T5, T5Config
from slim_jax.nn import SlimConfig, SlimLinear, inject

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

PROMPTS = [[1, 5, 6], [1, 7]]
NEW = 6


def slim_config(p: float) -> SlimConfig:
    return SlimConfig(num_lora_experts=2, num_identity_experts=1, top_k=2, rank=2, alpha=4,
                      num_clusters=2, dropmerge_p=p)


def adapted(model: nnx.Module, pattern: str, p: float) -> nnx.Module:
    """`model` with SLIM layers at `pattern`, non-zero experts (so masks change the output),
    in inference mode."""
    inject(model, pattern, slim_config(p), rngs=nnx.Rngs(1))
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "experts_b":
            var.set_value(0.5 * jax.random.normal(jax.random.key(len(path)), var.shape))
    model.eval()
    return model


def counts(model: nnx.Module) -> dict[str, int]:
    """How many keys each SLIM layer has drawn from its stream, by path."""
    return {"/".join(map(str, path)): int(layer.rngs.count[...])
            for path, layer in nnx.iter_modules(model)
            if isinstance(layer, SlimLinear) and layer.rngs is not None}


def host_state(model: nnx.Module) -> list[np.ndarray]:
    """Every non-parameter array of `model` (keys as their raw data), on the host."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in leaves]


def llama(p: float) -> Llama:
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=4, num_kv_heads=2, eos_ids=(2,), pad_id=0)
    return adapted(Llama(cfg, rngs=nnx.Rngs(0)), r"q_proj|down_proj", p)


@pytest.fixture(scope="module")
def slim_llama() -> Llama:
    return llama(0.5)


@nnx.jit
def _call(model: Llama, tokens: jax.Array, positions: jax.Array, cache):
    return model(tokens, positions=positions, segment_ids=jnp.ones_like(tokens), cache=cache)


def stepwise_greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding from the host, one `nnx.jit` model call per token (NNX propagates the
    stream updates of each call): the reference for `generate`."""
    tokens = jnp.asarray([prompt])
    cache = model.init_cache(1, len(prompt) + n)
    logits, cache = _call(model, tokens, jnp.arange(len(prompt))[None], cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    for t in range(1, n):
        logits, cache = _call(model, jnp.asarray([[out[-1]]]),
                              jnp.asarray([[len(prompt) + t - 1]]), cache)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def test_llama_masks_are_redrawn_on_every_forward_pass(slim_llama):
    nnx.reseed(slim_llama, slim=3)
    before = counts(slim_llama)
    out = gen.generate(slim_llama, PROMPTS[:1], max_new_tokens=NEW, stop_ids=())
    # The prefill and every step drew one mask pair per layer, and the streams were written back.
    assert counts(slim_llama) == {path: c + NEW for path, c in before.items()}
    assert len(before) == 2
    # The same draws, one model call at a time from the host, write the same tokens.
    nnx.reseed(slim_llama, slim=3)
    assert out.tokens == [stepwise_greedy(slim_llama, PROMPTS[0], NEW)]


def test_llama_calls_differ_reseeding_repeats_and_nothing_recompiles(slim_llama):
    nnx.reseed(slim_llama, slim=7)
    first = gen.generate(slim_llama, PROMPTS, max_new_tokens=NEW, stop_ids=())
    size = gen.generation_program._cache_size()
    second = gen.generate(slim_llama, PROMPTS, max_new_tokens=NEW, stop_ids=())
    assert second.tokens != first.tokens  # the streams moved on: other masks, other text
    nnx.reseed(slim_llama, slim=7)
    again = gen.generate(slim_llama, PROMPTS, max_new_tokens=NEW, stop_ids=())
    assert again.tokens == first.tokens
    # the stream state is an input, not a constant
    assert gen.generation_program._cache_size() == size


def test_llama_without_dropmerge_is_deterministic_and_keeps_its_streams():
    model = llama(0.0)
    before = host_state(model)
    first = gen.generate(model, PROMPTS[:1], max_new_tokens=NEW, stop_ids=())
    assert gen.generate(model, PROMPTS[:1], max_new_tokens=NEW, stop_ids=()).tokens == first.tokens
    after = host_state(model)
    assert len(before) == len(after) == 10  # per layer: key, count, 3 cluster statistics
    for u, v in zip(before, after, strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.fixture(scope="module")
def slim_t5() -> T5:
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                   num_decoder_layers=1, num_heads=2)
    pattern = r"(SelfAttention/q|EncDecAttention/k|DenseReluDense/wo)$"
    return adapted(T5(cfg, rngs=nnx.Rngs(0)), pattern, 0.5)


def test_t5_masks_are_redrawn_per_pass_and_reseeding_repeats(slim_t5):
    rows = [[5, 7, 1], [3, 1]]
    nnx.reseed(slim_t5, slim=3)
    before = counts(slim_t5)
    first = gen.generate(slim_t5, rows, max_new_tokens=NEW, stop_ids=())
    drawn = {path: c - before[path] for path, c in counts(slim_t5).items()}
    # Encoder layers and the cross-attention keys run once; decoder layers once per token.
    assert drawn == {
        "encoder/block/0/layer/0/SelfAttention/q": 1,
        "encoder/block/0/layer/1/DenseReluDense/wo": 1,
        "decoder/block/0/layer/0/SelfAttention/q": NEW,
        "decoder/block/0/layer/1/EncDecAttention/k": 1,
        "decoder/block/0/layer/2/DenseReluDense/wo": NEW,
    }
    size = gen.generation_program._cache_size()
    second = gen.generate(slim_t5, rows, max_new_tokens=NEW, stop_ids=())
    nnx.reseed(slim_t5, slim=3)
    again = gen.generate(slim_t5, rows, max_new_tokens=NEW, stop_ids=())
    assert again.tokens == first.tokens != second.tokens
    assert gen.generation_program._cache_size() == size
