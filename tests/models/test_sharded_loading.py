"""Mesh-aware loading: with 8 host devices, `from_pretrained(..., mesh=...)` puts every tensor
straight into its sharding, each device holding only its shard, reading only the safetensors
slices the devices hold, and the logits equal those of unsharded loading."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from slim_jax.models.lazy import LazyTensor
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.llama_hf import path_to_hf_name
from slim_jax.models.t5 import T5, T5Config
from slim_jax.models.t5_hf import path_to_hf_name as t5_path_to_hf_name
from slim_jax.parallel.mesh import MeshConfig, make_mesh


def _save(model: nnx.Module, folder, config: dict, to_name, shards: int = 2) -> None:
    """The model as a sharded Hugging Face safetensors checkpoint (kernels `[d_out, d_in]`)."""
    tensors = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            name = "/".join(map(str, path))
            array = np.asarray(var[...])
            tensors[to_name(name)] = np.ascontiguousarray(array.T if name.endswith("kernel")
                                                          else array)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        safetensors.numpy.save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 8, "tests/conftest.py gives 8 host devices"
    return make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])


def test_llama_loads_onto_the_mesh_reading_only_local_slices(tmp_path, mesh, monkeypatch):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, eos_ids=(2,))
    _save(Llama(config, rngs=nnx.Rngs(3)), tmp_path, {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "eos_token_id": 2}, path_to_hf_name)
    reads: list[tuple[str, tuple[int, ...]]] = []
    read = LazyTensor.__getitem__

    def recording(self, index):
        block = read(self, index)
        reads.append((self.name, block.shape))
        return block

    monkeypatch.setattr(LazyTensor, "__getitem__", recording)
    sharded = Llama.from_pretrained(tmp_path, mesh=mesh)
    plain = Llama.from_pretrained(tmp_path)

    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(8, 16)}  # [32, 32] over 4 x 2
    for _, var in nnx.iter_graph(sharded):
        if isinstance(var, nnx.Param):
            value = var[...]
            assert all(s.data.shape == value.sharding.shard_shape(value.shape)
                       for s in value.addressable_shards)
    # Every read of the q kernel is one device's block, never the whole tensor.
    q_reads = {shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"}
    assert q_reads == {(8, 16)}
    tokens = jnp.array([[1, 5, 9, 3, 7, 2]])
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(plain(tokens)), atol=1e-5)


def test_t5_loads_onto_the_mesh_with_the_same_logits(tmp_path, mesh):
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8)
    _save(T5(config, rngs=nnx.Rngs(3)), tmp_path, {
        "model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 48,
        "num_layers": 1, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "scale_decoder_outputs": False}, t5_path_to_hf_name)
    sharded, plain = T5.from_pretrained(tmp_path, mesh=mesh), T5.from_pretrained(tmp_path)
    wi = sharded.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel[...]
    assert {s.data.shape for s in wi.addressable_shards} == {(8, 24)}
    enc, dec = jnp.array([[4, 5, 6, 1]]), jnp.array([[0, 7, 8]])
    np.testing.assert_allclose(np.asarray(sharded(enc, dec)), np.asarray(plain(enc, dec)),
                               atol=1e-5)


def test_a_nan_weight_is_refused_on_the_mesh_naming_the_tensor(tmp_path, mesh):
    from slim_jax.errors import CheckpointError

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2, eos_ids=(2,))
    model = Llama(config, rngs=nnx.Rngs(3))
    kernel = model.layers[0].self_attn.q_proj.kernel
    kernel[...] = kernel[...].at[5, 7].set(jnp.nan)
    _save(model, tmp_path, {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "eos_token_id": 2}, path_to_hf_name)
    with pytest.raises(CheckpointError, match=r"q_proj.*NaN or infinite"):
        Llama.from_pretrained(str(tmp_path), mesh=mesh)
