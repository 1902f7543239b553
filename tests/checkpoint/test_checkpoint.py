"""Orbax checkpoints: round trip of NNX state, keep-N, async, restore onto another mesh, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from slim_jax.checkpoint import Checkpointer, abstract
from slim_jax.errors import CheckpointError
from slim_jax.parallel import MeshConfig, make_mesh, shard, tree_shardings


class Adapted(nnx.Module):
    """A layer with a frozen kernel, LoRA factors, cluster-like state and an RNG stream."""

    def __init__(self, seed: int) -> None:
        keys = jax.random.split(jax.random.key(seed), 3)
        self.kernel = nnx.Param(jax.random.normal(keys[0], (16, 8)), logical_axes=("embed", "mlp"))
        self.lora_a = nnx.LoRAParam(jax.random.normal(keys[1], (16, 4)),
                                    logical_axes=("embed", "lora_rank"))
        self.lora_b = nnx.LoRAParam(jax.random.normal(keys[2], (4, 8)),
                                    logical_axes=("lora_rank", "mlp"))
        self.centres = nnx.BatchStat(jnp.full((2, 16), float(seed)),
                                     logical_axes=("cluster", "embed"))
        self.rngs = nnx.Rngs(seed)


def _items(model: nnx.Module, mesh) -> dict:
    adapters = nnx.state(model, nnx.LoRAParam)
    state = nnx.state(model, nnx.Not(nnx.Param))
    items = {"adapters": adapters, "state": state, "optimizer": optax.adam(1e-3).init(adapters)}
    return shard(items, tree_shardings(items, mesh))


def _values(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(jax.device_get(x)))
    return out


def test_written_on_eight_devices_restored_on_one(tmp_path):
    eight = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    saved = _items(Adapted(1), eight)
    assert saved["adapters"]["lora_a"].get_value().sharding.spec == P("fsdp", None)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, saved, meta={"data_position": {"epoch": 1, "index": 3}})

    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    target = _items(Adapted(2), one)  # other values, same structure, one device
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(target)
    assert meta == {"step": 5, "data_position": {"epoch": 1, "index": 3}}
    for a, b in zip(_values(saved), _values(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    lora_a = restored["adapters"]["lora_a"]
    assert isinstance(lora_a, nnx.LoRAParam) and lora_a.logical_axes == ("embed", "lora_rank")
    assert lora_a.get_value().sharding.device_set == {jax.devices()[0]}


def test_restore_onto_another_sharding_from_abstract_targets(tmp_path):
    saved = _items(Adapted(3), make_mesh(MeshConfig(data=8)))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"adapters": saved["adapters"]})
        other = make_mesh(MeshConfig(data=1, fsdp=8))
        target = abstract(shard(saved["adapters"], tree_shardings(saved["adapters"], other)))
        restored, _ = ckpt.restore({"adapters": target})
    lora_a = restored["adapters"]["lora_a"]
    assert lora_a.sharding.spec == P("fsdp", None)  # abstract targets come back as plain arrays
    np.testing.assert_array_equal(np.asarray(lora_a), np.asarray(saved["adapters"]["lora_a"]))


def test_keep_n_async_and_latest(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with Checkpointer(tmp_path, keep=2, async_save=True) as ckpt:
        for step in (1, 2, 3):
            tree = {"w": jnp.full((4,), float(step))}
            assert ckpt.save(step, {"adapters": shard(tree, tree_shardings(tree, mesh))})
        assert not ckpt.save(3, {"adapters": {"w": jnp.zeros(4)}})  # already saved
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        restored, meta = ckpt.restore({"adapters": {"w": jnp.zeros(4)}}, step=2)
        assert restored["adapters"]["w"].tolist() == [2.0] * 4 and meta["step"] == 2
        assert ckpt.restore_meta() == {"step": 3}


def test_items_without_arrays_are_allowed(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"adapters": {"w": jnp.ones(2)}, "state": {}})
        restored, _ = ckpt.restore({"adapters": {"w": jnp.zeros(2)}, "state": {}})
    assert restored["state"] == {}


def test_errors_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"keep must be >= 1"):
        Checkpointer(tmp_path, keep=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"no checkpoint in .*; steps there: \[\]"):
            ckpt.restore({"adapters": {"w": jnp.zeros(2)}})
        ckpt.save(1, {"adapters": {"w": jnp.ones(2)}})
        with pytest.raises(CheckpointError, match=r"no checkpoint at step 7 .*steps there: \[1\]"):
            ckpt.restore({"adapters": {"w": jnp.zeros(2)}}, step=7)
        with pytest.raises(CheckpointError, match=r"metadata must be JSON-serialisable"):
            ckpt.save(2, {"adapters": {"w": jnp.ones(2)}}, meta={"bad": object()})
        with pytest.raises(CheckpointError, match=r"'meta' is reserved"):
            ckpt.save(2, {"meta": {"w": jnp.ones(2)}})
        with pytest.raises(CheckpointError, match=r"does not fit the requested items"):
            ckpt.restore({"optimizer": {"w": jnp.zeros(2)}})


def test_async_save_is_safe_against_donating_the_saved_buffers(tmp_path):
    """The trainer donates its state to the next step right after `save` returns."""
    mesh = make_mesh(MeshConfig(data=8))
    tree = {"w": jnp.arange(64.0).reshape(8, 8)}
    tree = shard(tree, tree_shardings(tree, mesh))
    expected = np.asarray(tree["w"])
    bump = jax.jit(lambda t: jax.tree.map(lambda x: x * 0 - 1, t), donate_argnums=0)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, {"adapters": tree})
        tree = bump(tree)  # overwrites the saved buffers while the files are being written
        restored, _ = ckpt.restore({"adapters": {"w": jnp.zeros((8, 8))}})
    np.testing.assert_array_equal(np.asarray(restored["adapters"]["w"]), expected)
    assert np.asarray(tree["w"]).max() == -1
