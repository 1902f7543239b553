"""The model-family protocol: the built-in families implement it, the registry picks a family by
`model_type`, and a third family (`toy_family.py`, one file) generates through the one `generate`,
loads through the registry and exchanges PEFT adapters, without any caller knowing it."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.family import ModelFamily
from slim_jax.models.generate import generate
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.peft_io import load_peft, save_peft
from slim_jax.models.registry import family_of, model_types, register_family
from slim_jax.models.t5 import T5, T5Config
from slim_jax.nn import LoRAConfig, SlimConfig, inject
from slim_jax.train.forward import token_mask_groups


@pytest.fixture(scope="module")
def toy(sibling):
    return sibling("toy_family")


def _llama():
    return Llama(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                             num_heads=2, num_kv_heads=1), rngs=nnx.Rngs(0))


def _t5():
    return T5(T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                       num_decoder_layers=1, num_heads=2), rngs=nnx.Rngs(0))


def test_builtin_families_implement_the_protocol_and_are_registered():
    for model in (_llama(), _t5()):
        assert isinstance(model, ModelFamily)
    assert family_of("llama") is Llama and family_of("qwen2") is Llama
    assert family_of("t5") is T5 and family_of("mt5") is T5
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not implemented; slim_jax loads "
                                          r"llama, mt5, qwen2, t5"):
        family_of("gpt2")


def test_registry_refuses_a_class_that_is_no_family_or_a_taken_model_type(toy):
    with pytest.raises(ConfigError, match="does not implement ModelFamily: missing layout"):
        register_family(("plain",), nnx.Linear)
    with pytest.raises(ConfigError, match="'llama' is already loaded as Llama"):
        register_family(("llama",), toy.Bigram)


def test_token_masks_follow_the_family():
    """Training's SLIM token masks ask the family which tokens each layer sees."""
    model = _t5()
    inject(model, r"(SelfAttention|EncDecAttention)/(q|k)$", SlimConfig(rank=1, num_clusters=1),
           rngs=nnx.Rngs(1))
    batch = {"enc_segment_ids": jnp.array([[1, 1, 0]]), "dec_segment_ids": jnp.array([[1, 0]])}
    # The encoder rows have 3 tokens, the decoder rows 2: the mask's width names its side.
    groups = {"enc" if mask.shape[1] == 3 else "dec": sorted(paths)
              for paths, mask in token_mask_groups(model, batch)}
    assert groups["enc"] == ["decoder/block/0/layer/1/EncDecAttention/k",
                             "encoder/block/0/layer/0/SelfAttention/k",
                             "encoder/block/0/layer/0/SelfAttention/q"]
    assert groups["dec"] == ["decoder/block/0/layer/0/SelfAttention/k",
                             "decoder/block/0/layer/0/SelfAttention/q",
                             "decoder/block/0/layer/1/EncDecAttention/q"]


def test_a_third_family_generates_through_the_one_generate(toy):
    model = toy.Bigram(toy.BigramConfig(vocab_size=12, hidden_size=8), rngs=nnx.Rngs(0))
    assert isinstance(model, ModelFamily) and family_of(toy.MODEL_TYPE) is toy.Bigram
    prompts = [[1, 5, 7], [1, 3]]
    out = generate(model, prompts, max_new_tokens=6, stop_ids=())
    # A bigram chain: each greedy token is the argmax after the previous one.
    table = np.asarray(model(jnp.arange(12)[None]))[0]
    for prompt, row in zip(prompts, out.tokens, strict=True):
        want, token = [], prompt[-1]
        for _ in range(6):
            token = int(table[token].argmax())
            want.append(token)
        assert row == want


def test_a_third_family_loads_by_model_type_and_takes_peft_adapters(toy, tmp_path):
    model = toy.Bigram(toy.BigramConfig(vocab_size=12, hidden_size=8), rngs=nnx.Rngs(0))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": toy.MODEL_TYPE, "vocab_size": 12, "hidden_size": 8}))
    safetensors.numpy.save_file({
        "embed.weight": np.asarray(model.embed.embedding[...]),
        "norm.weight": np.asarray(model.norm.scale[...]),
        "lm_head.weight": np.ascontiguousarray(np.asarray(model.lm_head.kernel[...]).T)},
        str(tmp_path / "model.safetensors"))
    loaded = family_of(toy.MODEL_TYPE).from_pretrained(tmp_path)
    tokens = jnp.array([[1, 4, 9]])
    np.testing.assert_array_equal(loaded(tokens), model(tokens))
    inject(model, "lm_head", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
    model.lm_head.lora_b[...] = jnp.ones_like(model.lm_head.lora_b[...])
    assert save_peft(model, tmp_path / "peft", base_model_name_or_path="toy").target_modules == (
        "lm_head",)
    assert load_peft(loaded, tmp_path / "peft") == ["lm_head"]
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-6)
    assert toy.MODEL_TYPE in model_types()
