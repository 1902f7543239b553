"""Sharding NNX state (parameters, adapters, optimiser state) and batches over the mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.nn import LoRAConfig, inject
from slim_jax.parallel import (
    BatchSizeError,
    MeshConfig,
    ShardingRuleError,
    check_global_batch,
    create_sharded,
    global_batch,
    make_mesh,
    shard,
    shard_module,
    tree_shardings,
)

MESH = MeshConfig(data=2, fsdp=2, tensor=2)
CONFIG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=4, num_kv_heads=2)


def _model() -> Llama:
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    inject(model, "q_proj|down_proj", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    return model


def test_model_and_adam_state_follow_the_logical_axes():
    mesh = make_mesh(MESH)
    model = shard_module(_model(), mesh)
    layer = model.layers[0]
    specs = {
        "embed_tokens": (model.embed_tokens.embedding, P("tensor", "fsdp")),
        "q_proj.kernel": (layer.self_attn.q_proj.kernel, P("fsdp", "tensor")),
        "q_proj.lora_a": (layer.self_attn.q_proj.lora_a, P("fsdp", None)),
        # adapter factors: their rank takes no axis, so d_out / d_in take tensor and fsdp both
        "q_proj.lora_b": (layer.self_attn.q_proj.lora_b, P(None, ("tensor", "fsdp"))),
        "down_proj.lora_a": (layer.mlp.down_proj.lora_a, P(("tensor", "fsdp"), None)),
        "norm": (layer.input_layernorm.scale, P(None)),
    }
    for name, (var, spec) in specs.items():
        assert var.get_value().sharding.spec == spec, name
    # Adam's moments are Variables with the parameter's metadata: sharded alike, no bookkeeping.
    adapters = nnx.state(model, nnx.LoRAParam)
    opt_state = optax.adamw(1e-3).init(adapters)
    shardings = tree_shardings(opt_state, mesh)
    mu = shardings[0].mu["layers"][0]["self_attn"]["q_proj"]["lora_a"].get_value()
    assert mu.spec == P("fsdp", None)
    assert shardings[0].count.spec == P()  # a bare array: replicated


def test_create_sharded_builds_in_place_and_matches_eager():
    mesh = make_mesh(MESH)
    sharded = create_sharded(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)), mesh)
    eager = Llama(CONFIG, rngs=nnx.Rngs(0))
    kernel = sharded.layers[0].mlp.up_proj.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.sharding.shard_shape(kernel.shape) == (8, 16)
    # The same random stream; compiled and op-by-op initialisers may differ in the last ulp.
    np.testing.assert_allclose(np.asarray(kernel),
                               np.asarray(eager.layers[0].mlp.up_proj.kernel.get_value()),
                               rtol=1e-6, atol=1e-7)


def test_variables_with_bad_axes_are_named():
    mesh = make_mesh(MESH)
    state = {"w": nnx.Param(jnp.zeros((4, 4)), logical_axes=("embed", "hidden"))}
    with pytest.raises(ShardingRuleError, match=r"^w: logical axis 'hidden' has no sharding rule"):
        tree_shardings(state, mesh)


def test_global_batch_is_split_over_data_and_fsdp():
    mesh = make_mesh(MESH)
    batch = global_batch({"tokens": np.arange(32, dtype=np.int32).reshape(8, 4),
                          "target_mask": np.ones((8, 4), np.float32)}, mesh)
    tokens = batch["tokens"]
    assert tokens.sharding.spec == P(("data", "fsdp"), None)
    assert tokens.sharding.shard_shape(tokens.shape) == (2, 4)
    np.testing.assert_array_equal(np.asarray(tokens), np.arange(32).reshape(8, 4))


def test_batch_not_divisible_is_named():
    mesh = make_mesh(MESH)
    with pytest.raises(BatchSizeError, match=r"global batch size 6 is not divisible by the 4 batch "
                                             r"shards \(mesh axes \('data', 'fsdp'\) of sizes "
                                             r"\[2, 2\]\).*use a multiple of 4"):
        global_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)
    with pytest.raises(BatchSizeError, match=r"use a multiple of 12"):
        check_global_batch(8, mesh, micro_steps=3)


def test_shard_places_a_replicated_tree_and_keys():
    mesh = make_mesh(MESH)
    tree = {"step": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}
    placed = shard(tree, tree_shardings(tree, mesh))
    assert len(placed["step"].sharding.device_set) == 8
    assert jax.random.key_data(placed["key"]).tolist() == jax.random.key_data(tree["key"]).tolist()
