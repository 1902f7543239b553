"""One training step sharded over three meshes equals the step on one device (issue 4)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slim_jax.nn import ClusterState
from slim_jax.parallel import MeshConfig
from slim_jax.train import Trainer

MESHES = {
    "data8": MeshConfig(data=8, fsdp=1, tensor=1),
    "data2-fsdp4": MeshConfig(data=2, fsdp=4, tensor=1),
    "data2-fsdp2-tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
}


def _pure(state: nnx.State) -> dict:
    return jax.device_get(nnx.to_pure_dict(state))


def _clusters(trainer: Trainer) -> dict:
    return _pure(nnx.filter_state(trainer.state.mutable, ClusterState))


@pytest.fixture(scope="module")
def reference(tiny):
    """The step on one device: its batch, loss, adapter update and cluster state."""
    trainer = Trainer(tiny.tiny_model(), tiny.train_config(), devices=jax.devices()[:1])
    batch = next(tiny.batches(8))
    before = _pure(trainer.state.params)
    metrics = trainer.train_step(batch)
    update = jax.tree.map(np.subtract, _pure(trainer.state.params), before)
    return batch, float(metrics["loss"]), update, _clusters(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_sharded_step_equals_one_device(tiny, reference, mesh):
    batch, loss, update, mutable = reference
    trainer = Trainer(tiny.tiny_model(), tiny.train_config(mesh))
    assert trainer.mesh.devices.size == 8
    before = _pure(trainer.state.params)
    metrics = trainer.train_step(batch)

    assert abs(float(metrics["loss"]) - loss) <= 1e-5
    sharded_update = jax.tree.map(np.subtract, _pure(trainer.state.params), before)
    assert max(np.abs(u).max() for u in jax.tree.leaves(update)) > 1e-4  # a real update
    assert tiny.max_abs_diff(sharded_update, update) <= 1e-5
    assert tiny.max_abs_diff(_clusters(trainer), mutable) <= 1e-5

    # The layout is the rules' (embed -> fsdp, heads -> tensor): base, adapter and Adam moment.
    q_proj = trainer.model().layers[0].self_attn.q_proj
    kernel, experts_a = q_proj.kernel.get_value(), q_proj.experts_a.get_value()
    mu = trainer.state.opt_state[1][0].mu["layers"][0]["self_attn"]["q_proj"]["experts_a"]
    # (Equivalence, not spec equality: the rules leave size-1 mesh axes out of the spec.)
    same = lambda x, spec: x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, spec), x.ndim)
    assert same(kernel, P("fsdp", "tensor"))
    assert same(experts_a, P(None, "fsdp", None)) and same(mu.get_value(), P(None, "fsdp", None))
    d = 16  # hidden size of the tiny model
    assert kernel.sharding.shard_shape(kernel.shape) == (d // mesh.fsdp, d // mesh.tensor)
