"""The run's logical-axis rules reach the model's activation constraints (mesh_context), in the
training step and in evaluation (apply_model runs a sharded model under its mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from slim_jax.eval.scoring import apply_model
from slim_jax.nn import LoRAConfig, inject
from slim_jax.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    constrain,
    current_rules,
    make_mesh,
    mesh_context,
    shard_module,
)
from slim_jax.train import TrainConfig
from slim_jax.train.aot import architecture, model_factory, train_step_program

TINY = dict(architecture("llama-3-8b"), vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
# Sequence parallelism: the activations' length axis on `tensor` (the defaults keep it whole).
SEQUENCE_PARALLEL = (("length", "tensor"), *DEFAULT_RULES)
LENGTH_ON_TENSOR = '[{"data", "fsdp"}, {"tensor"}, {}]'  # [batch, length, embed] constrained


def _lowered_step(rules) -> str:
    def make():
        model = model_factory(TINY, dtype=jnp.float32, param_dtype=jnp.float32)()
        inject(model, r"(q|v)_proj$", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
        return model

    config = TrainConfig(steps=2, mesh=MeshConfig(data=2, fsdp=2, tensor=2), rules=rules)
    mesh = make_mesh(config.mesh)
    program = train_step_program(nnx.eval_shape(make), mesh, config, batch_size=4, seq_len=8)
    return program.step.lower(*program.args).as_text()


def test_the_run_rules_reach_the_training_step_constraints():
    assert LENGTH_ON_TENSOR in _lowered_step(SEQUENCE_PARALLEL)
    assert LENGTH_ON_TENSOR not in _lowered_step(DEFAULT_RULES)


def _scaled(model, x):  # module level: apply_model caches one program per function
    return constrain(model(x), ("batch", "embed"))


def test_evaluation_runs_a_sharded_model_under_its_mesh_and_rules():
    mesh = make_mesh(MeshConfig(data=-1))  # 8 host devices
    layer = nnx.Linear(4, 8, rngs=nnx.Rngs(0), kernel_metadata={"logical_axes": (None, "embed")},
                       use_bias=False)
    shard_module(layer, mesh)  # `embed` has no data rule: replicated on the 8 devices
    x = jnp.ones((8, 4))
    # The batch constraint takes effect: rows split over the mesh's data axis.
    out = apply_model(layer, _scaled, x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data", None)), 2)
    # An enclosing mesh_context's rules are the constraints' rules (features split instead).
    rules = (("batch", None), ("embed", "data"))
    with mesh_context(mesh, rules):
        assert current_rules() == rules
        out = apply_model(layer, _scaled, x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "data")), 2)
    assert current_rules() == DEFAULT_RULES
    # An unsharded model runs as it did, without a mesh.
    plain = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    assert len(apply_model(plain, lambda m, x: m(x), x).sharding.device_set) == 1
    assert jax.numpy.allclose(apply_model(layer, _scaled, x), plain(x))
