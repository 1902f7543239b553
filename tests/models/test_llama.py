"""slim_jax's Llama against transformers' on tiny random checkpoints made here with save_pretrained:
logits on padded batches (left and right), greedy generation, loading, configs, masks, the cache."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError, ShapeError
from slim_jax.models.generate import generate
from slim_jax.models.llama import (
    Llama,
    LlamaConfig,
    RopeScaling,
    rope_frequencies,
)
from slim_jax.models.llama_hf import hf_name_to_path, path_to_hf_name

VOCAB = 96

# Three checkpoints: GQA with llama3 RoPE scaling (its medium band exercised: original context 16);
# linear RoPE scaling with q/k/v/o biases; Qwen2 (q/k/v bias only) with tied embeddings.
VARIANTS = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 500.0})),
    "linear_bias": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        attention_bias=True, num_key_value_heads=4)),
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
}


def _save_tiny(folder, kind: str):
    config_cls, overrides = VARIANTS[kind]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**kwargs, **overrides}))
    with torch.no_grad():  # biases start at zero and norms at one: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (transformers model, slim_jax model, folder), made on first use."""
    made = {}

    def get(kind: str):
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind)
            made[kind] = _save_tiny(folder, kind), Llama.from_pretrained(folder), folder
        return made[kind]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, checkpoints):
    return checkpoints(request.param)


@pytest.fixture(scope="module")
def llama3(checkpoints):
    return checkpoints("llama3")


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
    return model(tokens, positions=positions, segment_ids=segment_ids)


def _padded_batch():
    """Row 0 left-padded, row 1 right-padded, row 2 full; positions count real tokens only."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, (3, 11))
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    mask[1, 7:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens * mask, mask, positions


def test_logits_match_transformers_on_padded_batch(tiny):
    hf_model, model, _ = tiny
    tokens, mask, positions = _padded_batch()
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def test_batch_logits_reads_the_causal_batch_keys(llama3):
    _, model, _ = llama3
    tokens, mask, positions = _padded_batch()
    batch = {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(positions),
             "segment_ids": jnp.asarray(mask), "targets": jnp.asarray(tokens),
             "target_mask": jnp.asarray(mask, jnp.float32)}
    got = nnx.jit(lambda m, b: m.batch_logits(b))(model, batch)
    np.testing.assert_array_equal(got, _forward(model, batch["tokens"], batch["positions"],
                                                batch["segment_ids"]))


def test_greedy_generation_matches_transformers(tiny):
    hf_model, model, _ = tiny
    prompts = [[1, 5, 9, 33, 4], [1, 77], [1, *range(3, 12)]]
    width = max(map(len, prompts))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                max_new_tokens=20, do_sample=False, pad_token_id=0,
                                eos_token_id=2)
    ref = [[t for t in row if t not in (0,)] for row in out[:, width:].tolist()]
    ref = [row[:row.index(2)] if 2 in row else row for row in ref]
    assert generate(model, prompts, max_new_tokens=20).tokens == ref


def test_from_pretrained_param_dtype_and_sharded(llama3, tmp_path):
    hf_model, model, _ = llama3
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    half = Llama.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    kernel = half.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(kernel, np.float32),
                               np.asarray(model.layers[0].self_attn.q_proj.kernel[...]),
                               rtol=1e-2, atol=1e-3)
    tokens, mask, positions = (jnp.asarray(a) for a in _padded_batch())
    np.testing.assert_allclose(_forward(half, tokens, positions, mask),
                               _forward(model, tokens, positions, mask), atol=0.1)


def test_every_parameter_has_logical_axes(tiny):
    _, model, _ = tiny
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert params
    for path, var in params:
        axes = var.get_metadata("logical_axes")
        assert len(axes) == var.ndim, path
    attn = model.layers[1].self_attn
    assert attn.q_proj.kernel.get_metadata("logical_axes") == ("embed", "heads")
    assert attn.k_proj.kernel.get_metadata("logical_axes") == ("embed", "kv_heads")
    assert model.layers[0].mlp.down_proj.kernel.get_metadata("logical_axes") == ("mlp", "embed")


def test_hf_names_round_trip(tiny):
    hf_model, _, _ = tiny
    for name in hf_model.state_dict():
        assert path_to_hf_name(hf_name_to_path(name)[0]) == name


def test_packed_segments_do_not_see_each_other(llama3):
    _, model, _ = llama3
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, VOCAB, 5).tolist(), rng.integers(3, VOCAB, 4).tolist()
    # Row 0 packs a and b; rows 1 and 2 hold each alone (right-padded): same logits.
    tokens = jnp.asarray([a + b + [0, 0], a + [0] * 6, b + [0] * 7])
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 2, [1] * 5 + [0] * 6, [3] * 4 + [0] * 7])
    positions = jnp.asarray([[*range(5), *range(4), 0, 0], [*range(5)] + [0] * 6,
                             [*range(4)] + [0] * 7])
    got = np.asarray(_forward(model, tokens, positions, segments))
    np.testing.assert_allclose(got[0, :5], got[1, :5], atol=1e-5)
    np.testing.assert_allclose(got[0, 5:9], got[2, :4], atol=1e-5)


def test_cached_decoding_equals_full_recomputation(llama3):
    _, model, _ = llama3
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, VOCAB, (2, 11)))
    full = _forward(model, tokens, jnp.broadcast_to(jnp.arange(11), (2, 11)),
                    jnp.ones((2, 11), jnp.int32))
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    logits, cache = step(model, tokens[:, :6], model.init_cache(2, 16))  # prefill 6, then 1 by 1
    pieces = [logits]
    for t in range(6, 11):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        pieces.append(logits)
    assert int(cache.end) == 11
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)


def test_call_shape_errors(llama3):
    _, small, _ = llama3
    tokens = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ShapeError, match=r"tokens must be \[batch, seq\]"):
        small(tokens[0])
    with pytest.raises(ShapeError, match=r"segment_ids must have the tokens' shape \(2, 5\)"):
        small(tokens, segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ShapeError, match=r"cache holds 2 rows of 4 slots \(0 filled\); tokens are "
                                         r"2 rows of 5"):
        small(tokens, cache=small.init_cache(2, 4))
    cache = dataclasses.replace(small.init_cache(2, 4), end=jnp.int32(3))
    with pytest.raises(ShapeError, match=r"4 slots \(3 filled\); tokens are 2 rows of 2"):
        small(tokens[:, :2], cache=cache)


def test_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for kind, (config_cls, overrides) in VARIANTS.items():
        if kind == "qwen2_tied":
            continue
        hf_config = config_cls(hidden_size=64, num_attention_heads=4, **overrides)
        rope = hf_config.rope_parameters
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
        ours = LlamaConfig.from_hf({**hf_config.to_dict(), "model_type": "llama"})
        got = rope_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)


def test_config_from_hf_reads_old_style_rope_and_eos_lists():
    cfg = LlamaConfig.from_hf({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 500000.0, "eos_token_id": [7, 6],
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.rope_theta == 500000.0 and cfg.eos_ids == (7, 6)
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not a Llama-family decoder"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; expected 'silu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
     "rope_type 'yarn' is not supported"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window attention"),
    ({"num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
])
def test_config_errors(change, message):
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf({**base, **change})


def test_wrong_shapes_name_the_parameter(llama3, tmp_path):
    hf_model, _, folder = llama3
    config = hf_model.config.to_dict()
    config["intermediate_size"] = 40  # the checkpoint's MLP is 48 wide
    transformers.AutoConfig.for_model(**config).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"parameter 'layers/0/mlp/\w+_proj/kernel': .* has "
                                              r"shape \((32, 48|48, 32)\), the model expects"):
        Llama.from_pretrained(tmp_path)


def test_eos_ids_include_generation_config(llama3, tmp_path):
    _, _, folder = llama3
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(folder / name)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 9]}')
    assert Llama.from_pretrained(tmp_path).config.eos_ids == (2, 9)


def test_untied_checkpoint_without_head_is_reported(llama3, tmp_path):
    import safetensors.numpy

    from slim_jax.models.hf import load_safetensors

    hf_model, _, folder = llama3
    arrays = {k: v for k, v in load_safetensors(folder).items() if k != "lm_head.weight"}
    safetensors.numpy.save_file(arrays, str(tmp_path / "model.safetensors"))
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"lacks 1 parameter.*lm_head/kernel"):
        Llama.from_pretrained(tmp_path)

