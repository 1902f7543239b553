"""Hugging Face checkpoint plumbing: directories, hub fallback, safetensors (single, sharded),
pickle refusal, dtype conversion, shape-checked assignment, and the HFTokenizer wrapper."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from slim_jax.errors import CheckpointError
from slim_jax.models import hf
from slim_jax.tokenizer import HFTokenizer, Tokenizer


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """One tiny random Llama saved whole, sharded (small max_shard_size) and as a pickle."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    whole, sharded, pickled = (tmp_path_factory.mktemp(n) for n in ("whole", "sharded", "pickled"))
    model.save_pretrained(whole)
    model.save_pretrained(sharded, max_shard_size="8KB")
    config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    return model, whole, sharded, pickled


def test_read_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a list; expected a JSON object"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        hf.read_config(tmp_path)


def test_sharded_equals_single_file(tiny_dirs):
    model, whole, sharded, _ = tiny_dirs
    index = json.loads((sharded / hf.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, shards = hf.load_safetensors(whole), hf.load_safetensors(sharded)
    assert single.keys() == shards.keys() == set(model.state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(shards[name], value.numpy())
        np.testing.assert_array_equal(single[name], value.numpy())


def test_missing_shard_is_named(tiny_dirs, tmp_path):
    _, _, sharded, _ = tiny_dirs
    index = json.loads((sharded / hf.SAFETENSORS_INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / hf.SAFETENSORS_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names shards missing from .*{first}"):
        hf.load_safetensors(tmp_path)


def test_dtype_conversion(tiny_dirs, tmp_path):
    _, whole, _, _ = tiny_dirs
    arrays = hf.load_safetensors(whole, dtype=jnp.bfloat16)
    assert {a.dtype for a in arrays.values()} == {np.dtype(ml_dtypes.bfloat16)}
    ints = {"ids": np.arange(3, dtype=np.int32), "w": np.ones(2, np.float32)}
    safetensors.numpy.save_file(ints, str(tmp_path / "x.safetensors"))
    loaded = hf.load_safetensors(tmp_path / "x.safetensors", dtype="float16")
    assert loaded["ids"].dtype == np.int32 and loaded["w"].dtype == np.float16


def test_pickle_refused_unless_allowed(tiny_dirs):
    model, _, _, pickled = tiny_dirs
    with pytest.raises(CheckpointError,
                       match=r"pytorch_model\.bin is a pickle .*allow_pickle=True"):
        hf.load_safetensors(pickled)
    with pytest.raises(CheckpointError, match="is a pickle"):
        hf.load_safetensors(pickled / "pytorch_model.bin")
    arrays = hf.load_safetensors(pickled, allow_pickle=True, dtype="bfloat16")
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(arrays[name],
                                  model.state_dict()[name].numpy().astype(ml_dtypes.bfloat16))


def test_bf16_pickle_tensors_keep_their_bits(tmp_path):
    tensor = torch.randn(3, 5).to(torch.bfloat16)
    torch.save({"w": tensor}, tmp_path / "weights.pt")
    got = hf.load_safetensors(tmp_path / "weights.pt", allow_pickle=True)["w"]
    np.testing.assert_array_equal(got.astype(np.float32), tensor.float().numpy())


def test_no_weights_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds no weights: expected model\.safetensors.*"
                                              r"it holds: config\.json"):
        hf.load_safetensors(tmp_path)


def test_assign_params_checks_names_and_shapes():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 4, rngs=nnx.Rngs(1)))
    good = {"layers/0/kernel": np.ones((2, 3)), "layers/0/bias": np.zeros(3),
            "layers/1/kernel": np.ones((3, 4)), "layers/1/bias": np.zeros(4)}
    with pytest.raises(CheckpointError,
                       match=r"parameter 'layers/1/kernel': ckpt has shape \(4, 3\), the model "
                             r"expects \(3, 4\)"):
        hf.assign_params(model, {**good, "layers/1/kernel": np.ones((4, 3))}, source="ckpt")
    with pytest.raises(CheckpointError, match="no parameter for: layers/2/kernel"):
        hf.assign_params(model, {**good, "layers/2/kernel": np.ones((1, 1))})
    with pytest.raises(CheckpointError, match=r"lacks 1 parameter.*layers/1/bias"):
        hf.assign_params(model, {k: v for k, v in good.items() if k != "layers/1/bias"})
    before = model.layers[0].kernel[...]
    hf.assign_params(model, {"layers/1/bias": np.full(4, 2.0)}, strict=False)
    np.testing.assert_array_equal(model.layers[1].bias[...], np.full(4, 2.0))
    np.testing.assert_array_equal(model.layers[0].kernel[...], before)


def test_assign_params_fills_an_abstract_model_in_param_dtype():
    abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0)))
    hf.assign_params(abstract, {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3)})
    assert isinstance(abstract.kernel[...], jax.Array)
    assert abstract.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(abstract(jnp.ones((1, 2))), np.full((1, 3), 2.0))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "once": 4, "upon": 5, "a": 6, "time": 7}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    raw.decoder = tokenizers.decoders.WordPiece()
    folder = tmp_path_factory.mktemp("tok")
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>")
    wrapped.save_pretrained(folder)
    return folder


def test_hf_tokenizer_wraps_auto_tokenizer(tokenizer_dir):
    tok = HFTokenizer(tokenizer_dir)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (8, 1, 2, 0)
    ids = tok.encode("once upon a time")
    assert ids == [4, 5, 6, 7]
    assert tok.encode("once", add_bos=True, add_eos=True) == [1, 4, 2]
    assert tok.decode([1, *ids, 2]) == "once upon a time"
    assert "</s>" in tok.decode([4, 2], skip_special_tokens=False)


def test_hf_tokenizer_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"no tokenizer: expected one of tokenizer\.json"):
        HFTokenizer(tmp_path)
