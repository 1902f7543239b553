"""The trainer: gradient accumulation, the NaN stop, a bf16 base, and named configuration errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.errors import ConfigError
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.nn import SlimConfig, inject
from slim_jax.parallel import BatchSizeError, MeshConfig, MeshError
from slim_jax.train import NonFiniteLossError, TrainConfig, Trainer, masked_batch_logits

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

ONE = jax.devices()[:1]


def _pure(state):
    return jax.device_get(nnx.to_pure_dict(state))


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tiny):
    """Two sharded micro-batches of 8 give the loss and update of one batch of 16 (LoRA)."""
    batch = next(tiny.batches(16))
    full = Trainer(tiny.tiny_model("lora"), tiny.train_config(), devices=ONE)
    accum = Trainer(tiny.tiny_model("lora"), tiny.train_config(
        MeshConfig(data=2, fsdp=2, tensor=2), grad_accum_steps=2))
    before = _pure(full.state.params)
    loss_full = float(full.train_step(batch)["loss"])
    loss_accum = float(accum.train_step(batch)["loss"])
    assert abs(loss_full - loss_accum) <= 1e-5
    update = jax.tree.map(np.subtract, _pure(full.state.params), before)
    update_accum = jax.tree.map(np.subtract, _pure(accum.state.params), before)
    assert tiny.max_abs_diff(update, update_accum) <= 1e-5
    assert max(np.abs(u).max() for u in jax.tree.leaves(update)) > 1e-4


class Poisoned:
    """Batches with a `scale` column: 1, or NaN for the `bad`-th batch (1-based)."""

    def __init__(self, batches, bad: int) -> None:
        self.batches, self.bad, self.drawn = batches, bad, 0

    def __next__(self):
        batch = dict(next(self.batches))
        self.drawn += 1
        rows = batch["tokens"].shape[0]
        batch["scale"] = np.full(rows, np.nan if self.drawn == self.bad else 1.0, np.float32)
        return batch

    def state(self):
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)


def _scaled_logits(model, batch):
    return masked_batch_logits(model, batch) * batch["scale"][:, None, None]


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_batch_and_keeps_last_checkpoint(tiny, tmp_path):
    config = tiny.train_config(run_dir=str(tmp_path), save_every=2, steps=6)
    trainer = Trainer(tiny.tiny_model("lora"), config, devices=ONE, forward=_scaled_logits)
    data = Poisoned(tiny.batches(8), bad=3)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan") as err:
        trainer.fit(data)
    message = str(err.value)
    assert "data position {'epoch': 0, 'index':" in message
    assert "last good checkpoint is step 2" in message
    saved = np.load(tmp_path / "nonfinite_batch_step3_process0.npz")
    assert np.isnan(saved["scale"]).all() and saved["tokens"].shape == (8, tiny.SEQ)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]


@pytest.mark.slow
def test_frozen_base_in_bfloat16_adapters_in_float32(tiny):
    trainer = Trainer(tiny.tiny_model("lora"), tiny.train_config(frozen_dtype="bfloat16"),
                      devices=ONE)
    q_proj = trainer.model().layers[0].self_attn.q_proj
    assert q_proj.kernel.get_value().dtype == jnp.bfloat16
    assert q_proj.lora_a.get_value().dtype == jnp.float32
    assert np.isfinite(float(trainer.train_step(next(tiny.batches(8)))["loss"]))


def test_mesh_that_does_not_match_the_devices_is_named(tiny):
    with pytest.raises(MeshError, match=r"needs 3 devices, but 8 are available"):
        Trainer(tiny.tiny_model("lora"), tiny.train_config(MeshConfig(data=3)))


def test_batch_not_divisible_by_the_data_axes_is_named(tiny):
    trainer = Trainer(tiny.tiny_model("lora"), tiny.train_config(MeshConfig(data=2, fsdp=4)))
    with pytest.raises(BatchSizeError, match=r"global batch size 4 is not divisible by the 8"):
        trainer.train_step(next(tiny.batches(4)))
    accum = Trainer(tiny.tiny_model("lora"), tiny.train_config(
        MeshConfig(data=8), grad_accum_steps=2))
    with pytest.raises(BatchSizeError, match=r"times the 2 gradient-accumulation micro-steps"):
        accum.train_step(next(tiny.batches(8)))


def test_unknown_target_module_and_missing_adapters_are_named():
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                         num_heads=2, num_kv_heads=1)
    model = Llama(config, rngs=nnx.Rngs(0))
    unknown = r"'qproj' matches no nnx.Linear .*available linear layers: .*self_attn/q_proj"
    with pytest.raises(ConfigError, match=unknown):
        inject(model, "qproj", SlimConfig(rank=2), rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match=r"no trainable variables .* inject adapters first"):
        Trainer(model, TrainConfig(steps=1, progress=False))


def test_fit_leaves_the_callers_model_untouched(tiny):
    """The step donates its buffers: the model handed to the Trainer keeps its own arrays."""
    model = tiny.tiny_model("slim")
    before = _pure(nnx.state(model, nnx.Param))
    trainer = Trainer(model, tiny.train_config(steps=2), devices=ONE)
    trainer.fit(tiny.batches())
    after = _pure(nnx.state(model, nnx.Param))  # reading a donated array would raise
    assert tiny.max_abs_diff(before, after) == 0.0
    trained = _pure(nnx.state(trainer.model(), nnx.Param))
    assert tiny.max_abs_diff(before, trained) > 0.0
