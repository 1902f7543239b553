"""The Trainer's step is traced under its mesh, so the models' activation constraints apply
(issue 10: batch on data/fsdp, heads and mlp on tensor), and they change no number."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.parallel import MeshConfig, global_batch
from slim_jax.train import Trainer

MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def _pure(state: nnx.State) -> dict:
    return jax.device_get(nnx.to_pure_dict(state))


@pytest.mark.slow  # compiles the step sharded over 8 devices (about 10 s on an idle core)
def test_train_step_constrains_activations_and_keeps_the_numbers(tiny):
    trainer = Trainer(tiny.tiny_model("lora"), tiny.train_config(MESH))
    batch = global_batch(next(tiny.batches(8)), trainer.mesh)

    # The tiny Llama (4 heads, 2 kv heads of 4, mlp 32; batch 8 x 16): the traced step pins q,
    # k, v [b, s, heads, head_dim] and the MLP hidden [b, s, mlp] to batch x tensor.
    text = trainer._step_fn.lower(trainer.state, trainer.frozen, batch).as_text()
    heads = r'\[\{"data", "fsdp"\}, \{\}, \{"tensor"\}, \{\}\]> : tensor<8x16xHx4xf32>'
    assert re.search(r"sharding_constraint .*" + heads.replace("H", "4"), text)  # q
    assert len(re.findall(r"sharding_constraint .*" + heads.replace("H", "2"), text)) >= 2
    assert re.search(r'sharding_constraint .*\[\{"data", "fsdp"\}, \{\}, \{"tensor"\}\]> : '
                     r"tensor<8x16x32xf32>", text)  # mlp hidden
    # The same jit traced without the mesh has no activation constraint (they are inert).
    bare = trainer._step_fn.fn.lower(trainer.state, trainer.frozen, batch).as_text()
    assert "sharding_constraint" not in bare

    # Unconstrained (the bare jit, on copies of the state) and constrained (under the mesh).
    copies = jax.tree.map(jnp.copy, trainer.state)
    before = _pure(trainer.state.params)
    plain_state, plain = trainer._step_fn.fn(copies, trainer.frozen, batch)
    constrained = trainer.train_step(next(tiny.batches(8)))
    for key in ("loss", "ce", "grad_norm"):
        assert abs(float(constrained[key]) - float(plain[key])) <= 1e-6, key
    update = jax.tree.map(np.subtract, _pure(trainer.state.params), before)
    plain_update = jax.tree.map(np.subtract, _pure(plain_state.params), before)
    assert max(np.abs(u).max() for u in jax.tree.leaves(update)) > 1e-4  # a real update
    assert tiny.max_abs_diff(update, plain_update) <= 1e-6
