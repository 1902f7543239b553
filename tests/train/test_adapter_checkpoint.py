"""A training run's checkpoint rebuilds its adapters on a bare base model (no injection by hand)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.models.adapter_io import load_adapter_checkpoint
from slim_jax.models.llama import Llama
from slim_jax.nn import adapter_paths, adapter_state
from slim_jax.train import Trainer


def test_trainer_checkpoint_restores_onto_bare_model(tiny, tmp_path):
    model = tiny.tiny_model("slim")
    trainer = Trainer(model, tiny.train_config(steps=2), devices=jax.devices()[:1])
    trainer.fit(tiny.batches())
    with Checkpointer(tmp_path / "ckpt", async_save=False) as checkpointer:
        trainer.save(checkpointer)
    trained = trainer.model()

    bare = Llama(trained.config, rngs=nnx.Rngs(0))  # same base weights: same seed as tiny_model
    assert not adapter_paths(bare)
    paths = load_adapter_checkpoint(bare, tmp_path / "ckpt")
    assert paths == sorted(adapter_paths(trained)) and paths

    restored = nnx.to_pure_dict(adapter_state(bare))
    expected = nnx.to_pure_dict(adapter_state(trained))
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), restored, expected)
    assert max(jax.tree.leaves(diffs)) == 0.0

    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 50
    bare.eval(), trained.eval()
    assert jnp.allclose(bare(tokens), trained(tokens), atol=1e-6)
