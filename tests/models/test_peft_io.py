"""PEFT LoRA adapters in and out of slim_jax T5 and Llama models, checked against peft itself."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.models import peft_io
from slim_jax.models.llama import Llama
from slim_jax.models.t5 import T5
from slim_jax.nn import LoRAConfig, LoRALinear, SlimConfig, adapted_layers, inject

VOCAB = 64


def _randomise(model: torch.nn.Module, seed: int, *, only: str = "") -> None:
    """Add noise to every parameter (or those whose name contains `only`): norms stop being ones
    and LoRA B stops being zero, so every weight shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn_like(p) * 0.2)


def _tiny_t5(folder) -> None:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    _randomise(model, 0)
    model.save_pretrained(folder)


def _tiny_llama(folder) -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 500.0})
    model = transformers.LlamaForCausalLM(config)
    _randomise(model, 0)
    model.save_pretrained(folder)


def _peft_adapter(base_cls, base_dir, adapter_dir, **lora):
    """Attach a peft LoRA to the transformers model in `base_dir`, randomise it, save it."""
    model = peft.get_peft_model(base_cls.from_pretrained(base_dir), peft.LoraConfig(**lora))
    _randomise(model, 1, only="lora_")
    model.save_pretrained(adapter_dir)
    return model.eval()


@pytest.fixture(scope="module")
def t5_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_peft")
    _tiny_t5(root / "base")
    peft_model = _peft_adapter(transformers.T5ForConditionalGeneration, root / "base",
                               root / "adapter", r=4, lora_alpha=8, target_modules=["q", "v"],
                               lora_dropout=0.1, task_type="SEQ_2_SEQ_LM")
    return root, peft_model


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_peft")
    _tiny_llama(root / "base")
    peft_model = _peft_adapter(transformers.LlamaForCausalLM, root / "base", root / "adapter",
                               r=4, lora_alpha=6, use_rslora=True, task_type="CAUSAL_LM",
                               target_modules=r".*\.(q_proj|v_proj|down_proj)")
    return root, peft_model


T5_ENC = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]])
T5_DEC = np.array([[0, 3, 4, 5, 6], [0, 7, 8, 0, 0]])
LLAMA_TOKENS = np.array([[1, 5, 6, 7, 8, 9], [1, 10, 11, 0, 0, 0]])


@nnx.jit
def _t5_logits(model, enc, dec):
    return model(enc, dec, enc_segment_ids=(enc != 0).astype(jnp.int32),
                 dec_segment_ids=jnp.ones_like(dec).at[1, 3:].set(0))


@nnx.jit
def _llama_logits(model, tokens):
    return model(tokens, segment_ids=(tokens != 0).astype(jnp.int32))


def _torch_t5_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(T5_ENC), attention_mask=torch.tensor(T5_ENC != 0),
                     decoder_input_ids=torch.tensor(T5_DEC)).logits.numpy()


def _torch_llama_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(LLAMA_TOKENS),
                     attention_mask=torch.tensor(LLAMA_TOKENS != 0)).logits.numpy()


def _assert_t5_close(ours, ref):
    real = np.ones(T5_DEC.shape, bool)
    real[1, 3:] = False
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=1e-4)


def _assert_llama_close(ours, ref):
    real = LLAMA_TOKENS != 0
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ reading


def test_t5_with_a_peft_adapter_gives_peft_logits(t5_setup):
    root, peft_model = t5_setup
    model = T5.from_pretrained(root / "base")
    base_logits = _t5_logits(model, jnp.asarray(T5_ENC), jnp.asarray(T5_DEC))
    paths = peft_io.load_peft(model, root / "adapter", base_model_name_or_path=root / "base")
    assert len(paths) == 2 * 2 + 2 * 2 * 2  # encoder self q, v; decoder self and cross q, v
    assert "decoder/block/1/layer/1/EncDecAttention/v" in paths
    ours = _t5_logits(model, jnp.asarray(T5_ENC), jnp.asarray(T5_DEC))
    _assert_t5_close(ours, _torch_t5_logits(peft_model))
    assert float(jnp.max(jnp.abs(ours - base_logits))) > 0.1  # the adapter matters


def test_llama_with_a_regex_rslora_adapter_gives_peft_logits(llama_setup):
    root, peft_model = llama_setup
    model = Llama.from_pretrained(root / "base")
    paths = peft_io.load_peft(model, root / "adapter")
    assert paths == sorted(f"layers/{i}/{m}" for i in range(2)
                           for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj"))
    assert model.layers[0].self_attn.q_proj.scale == pytest.approx(6 / 2)  # alpha / sqrt(r)
    _assert_llama_close(_llama_logits(model, jnp.asarray(LLAMA_TOKENS)),
                        _torch_llama_logits(peft_model))


def test_target_module_names_are_kept_sorted(t5_setup, tmp_path):
    # PEFT holds target_modules as a set and writes it in set order (which changes with the
    # interpreter's hash seed): reading and writing pin the sorted order.
    root, _ = t5_setup
    shuffled = _edited_adapter(root / "adapter", tmp_path / "a",
                               config={"target_modules": ["v", "q", "v"]})
    assert peft_io.read_peft_config(shuffled).target_modules == ("q", "v")
    assert peft_io.read_peft_config(root / "adapter").target_modules == ("q", "v")
    model = T5.from_pretrained(root / "base")
    inject(model, r"SelfAttention/v$", LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    inject(model, r"Attention/q$", LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    peft_io.save_peft(model, tmp_path / "out", base_model_name_or_path="tiny-t5")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["target_modules"].startswith("(?:decoder")  # self-attention v only: a regex
    names = written["target_modules"][3:-1].replace("\\", "").split("|")
    assert names == sorted(names) and len(names) == 2 * 2 + 2 * 2 * 2 - 2


def test_factors_come_in_slim_jax_layout(t5_setup):
    root, peft_model = t5_setup
    abstract = nnx.eval_shape(lambda: T5.from_pretrained(root / "base"))
    config, factors = peft_io.load_peft_factors(root / "adapter", abstract)
    assert (config.rank, config.alpha, config.target_modules, config.dropout) == (
        4, 8.0, ("q", "v"), 0.1)
    a, b = factors["encoder/block/1/layer/0/SelfAttention/v"]
    layer = peft_model.base_model.model.encoder.block[1].layer[0].SelfAttention.v
    np.testing.assert_array_equal(a, layer.lora_A["default"].weight.detach().numpy().T)
    np.testing.assert_array_equal(b, layer.lora_B["default"].weight.detach().numpy().T)
    assert a.shape == (16, 4) and b.shape == (4, 16) and a.dtype == np.float32


# ------------------------------------------------------------------------------------ writing


def test_exported_t5_adapter_loads_in_peft_with_the_same_logits(t5_setup, tmp_path):
    root, _ = t5_setup
    model = T5.from_pretrained(root / "base")
    # Only the cross-attention k/o and wi_1: PEFT's name list would also catch self-attention k/o,
    # so the export must fall back to an exact regex.
    inject(model, r"(EncDecAttention/(k|o)|wi_1)$", LoRAConfig(rank=3, alpha=5),
           rngs=nnx.Rngs(0))
    for i, layer in enumerate(adapted_layers(model).values()):
        layer.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), layer.lora_b.shape))
    config = peft_io.save_peft(model, tmp_path, base_model_name_or_path=str(root / "base"))
    assert isinstance(config.target_modules, str)
    base = transformers.T5ForConditionalGeneration.from_pretrained(root / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    _assert_t5_close(_t5_logits(model, jnp.asarray(T5_ENC), jnp.asarray(T5_DEC)),
                     _torch_t5_logits(loaded))
    fresh = T5.from_pretrained(root / "base")  # and back into slim_jax
    peft_io.load_peft(fresh, tmp_path)
    for path, layer in adapted_layers(fresh).items():
        np.testing.assert_array_equal(layer.lora_b[...], adapted_layers(model)[path].lora_b[...])


def test_exported_llama_adapter_loads_in_peft_with_the_same_logits(llama_setup, tmp_path):
    root, _ = llama_setup
    model = Llama.from_pretrained(root / "base")
    inject(model, r"(q_proj|up_proj)$", LoRAConfig(rank=2, alpha=4, rslora=True),
           rngs=nnx.Rngs(0))
    for i, layer in enumerate(adapted_layers(model).values()):
        layer.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), layer.lora_b.shape))
    config = peft_io.save_peft(model, tmp_path, base_model_name_or_path="tiny-llama")
    assert config.target_modules == ("q_proj", "up_proj") and config.use_rslora
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["task_type"] == "CAUSAL_LM" and written["r"] == 2
    assert written["target_modules"] == ["q_proj", "up_proj"]
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    _assert_llama_close(_llama_logits(model, jnp.asarray(LLAMA_TOKENS)),
                        _torch_llama_logits(loaded))


# ---------------------------------------------------------------------------------- bad input


def _edited_adapter(source, target, *, config=None, weights=None):
    """A copy of the adapter in `source`, its config updated and weights replaced if given."""
    shutil.copytree(source, target)
    if config is not None:
        raw = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if weights is not None:
        tensors = safetensors.numpy.load_file(str(source / "adapter_model.safetensors"))
        safetensors.numpy.save_file(weights(tensors), str(target / "adapter_model.safetensors"))
    return target


@pytest.fixture(scope="module")
def abstract_t5(t5_setup):
    root, _ = t5_setup
    return nnx.eval_shape(lambda: T5.from_pretrained(root / "base"))


def test_unknown_target_is_named(t5_setup, abstract_t5, tmp_path):
    root, _ = t5_setup
    bad = _edited_adapter(root / "adapter", tmp_path / "a",
                          config={"target_modules": ["q", "q_proj"]})
    with pytest.raises(CheckpointError, match=r"\['q_proj'\] match no linear.*'wi_0'"):
        peft_io.load_peft_factors(bad, abstract_t5)


def test_adapter_of_another_architecture_is_named(t5_setup, llama_setup):
    t5_root, _ = t5_setup
    llama_root, _ = llama_setup
    llama = nnx.eval_shape(lambda: Llama.from_pretrained(llama_root / "base"))
    with pytest.raises(CheckpointError, match=r"target_modules \['q', 'v'\] match no linear"):
        peft_io.load_peft_factors(t5_root / "adapter", llama)


def test_wrong_shape_names_the_layer(t5_setup, abstract_t5, tmp_path):
    root, _ = t5_setup
    key = "base_model.model.encoder.block.1.layer.0.SelfAttention.q.lora_A.weight"
    bad = _edited_adapter(root / "adapter", tmp_path / "a",
                          weights=lambda t: {**t, key: np.zeros((4, 12), np.float32)})
    with pytest.raises(CheckpointError, match=r"'encoder\.block\.1\.layer\.0\.SelfAttention\.q' "
                                              r"has lora_A \(4, 12\).*needs \(4, 16\)"):
        peft_io.load_peft_factors(bad, abstract_t5)


def test_weights_that_do_not_fit_the_targets_are_named(t5_setup, abstract_t5, tmp_path):
    root, _ = t5_setup
    gone = "base_model.model.decoder.block.0.layer.1.EncDecAttention.v.lora_B.weight"
    bad = _edited_adapter(root / "adapter", tmp_path / "a",
                          weights=lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"lacks lora_A/lora_B weights of 1 targeted "
                                              r"layer\(s\): decoder\.block\.0\.layer\.1\."
                                              r"EncDecAttention\.v"):
        peft_io.load_peft_factors(bad, abstract_t5)
    extra = "base_model.model.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight"
    bad = _edited_adapter(root / "adapter", tmp_path / "b",
                          weights=lambda t: {**t, extra: np.zeros((4, 16), np.float32)})
    with pytest.raises(CheckpointError, match=r"weights for 'encoder\.block\.0\.layer\.0\."
                                              r"SelfAttention\.k', which its target_modules"):
        peft_io.load_peft_factors(bad, abstract_t5)


def test_other_base_model_is_named(t5_setup, abstract_t5):
    root, _ = t5_setup
    with pytest.raises(CheckpointError, match=r"trained on base model .*base', not "
                                              r"'google/flan-t5-large'"):
        peft_io.load_peft_factors(root / "adapter", abstract_t5,
                                  base_model_name_or_path="google/flan-t5-large")


@pytest.mark.parametrize(("option", "message"), [
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"rank_pattern": {"q": 8}}, "rank_pattern=.* is not supported"),
    ({"layers_to_transform": [0]}, "layers_to_transform=.* is not supported"),
])
def test_unsupported_options_are_named(t5_setup, tmp_path, option, message):
    root, _ = t5_setup
    bad = _edited_adapter(root / "adapter", tmp_path / "a", config=option)
    with pytest.raises(ConfigError, match=message):
        peft_io.read_peft_config(bad)


def test_missing_and_pickled_files_are_named(t5_setup, abstract_t5, tmp_path):
    root, _ = t5_setup
    with pytest.raises(CheckpointError, match=r"has no adapter_config\.json"):
        peft_io.read_peft_config(tmp_path)
    shutil.copy(root / "adapter" / "adapter_config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"has no adapter_model\.safetensors"):
        peft_io.load_peft_factors(tmp_path, abstract_t5)
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        peft_io.load_peft_factors(tmp_path, abstract_t5)


def test_loading_onto_a_lora_of_another_rank_is_named(t5_setup):
    root, _ = t5_setup
    model = T5.from_pretrained(root / "base")
    inject(model, r"encoder/block/0/layer/0/SelfAttention/q$", LoRAConfig(rank=2),
           rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="already has a LoRA adapter \\(rank 2"):
        peft_io.load_peft(model, root / "adapter")


def test_saving_what_peft_cannot_hold_is_named(t5_setup, tmp_path):
    root, _ = t5_setup
    model = T5.from_pretrained(root / "base")
    with pytest.raises(CheckpointError, match="has no LoRA adapter to save"):
        peft_io.save_peft(model, tmp_path, base_model_name_or_path="x")
    inject(model, r"SelfAttention/q$", LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    inject(model, r"SelfAttention/v$", LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="the LoRA layers differ"):
        peft_io.save_peft(model, tmp_path, base_model_name_or_path="x")
    inject(model, r"wi_0$", SlimConfig(rank=2, num_clusters=1), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="SLIM layers have no PEFT LoRA form"):
        peft_io.save_peft(model, tmp_path, base_model_name_or_path="x")
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, LoRALinear)
