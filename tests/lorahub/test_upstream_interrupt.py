"""Upstream module training interrupted by a stop signal: the short module is never returned (so
never recorded as finished), the next call resumes it from its checkpoint and ends where an
uninterrupted run ends, and a module folder is written whole or not at all."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest

from slim_jax.data import BatchIterator, ByteTokenizer, CausalLayout, Example
from slim_jax.lorahub import upstream
from slim_jax.lorahub.upstream import UpstreamConfig, save_module, train_module
from slim_jax.nn import LoRAConfig
from slim_jax.parallel import MeshConfig
from slim_jax.train import OptimizerConfig, TrainConfig, TrainingInterrupted
from tests.lorahub.conftest import tiny_llama

STEPS, SIGNAL_AT = 6, 4
CONFIG = UpstreamConfig(
    lora=LoRAConfig(rank=2, alpha=4.0), targets=r"(q|v)_proj$", batch_size=4,
    train=TrainConfig(steps=STEPS, progress=False, save_every=0, async_checkpoint=False,
                      mesh=MeshConfig(data=1),
                      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0)))
EXAMPLES = [Example(f"{i % 7}+{i % 5}=", str(i % 7 + i % 5)) for i in range(32)]
LAYOUT = CausalLayout(ByteTokenizer(), lengths=(16,))


class SignalledBatches(BatchIterator):
    """Sends this process SIGTERM as batch `SIGNAL_AT` is drawn (a scheduler's preemption)."""

    def __next__(self):
        self.drawn = getattr(self, "drawn", 0) + 1
        if self.drawn == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def factors(module):
    return {p: np.concatenate([a.ravel(), b.ravel()]) for p, (a, b) in module.factors.items()}


@pytest.mark.slow
def test_an_interrupted_module_is_not_returned_and_resumes_from_its_checkpoint(tmp_path,
                                                                            monkeypatch):
    import jax

    devices = jax.devices()[:1]
    model = tiny_llama()
    reference, ref_history = train_module(model, LAYOUT, EXAMPLES, "task", CONFIG, seed=3,
                                          devices=devices)
    assert [r["step"] for r in ref_history] == list(range(1, STEPS + 1))

    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        patch.setattr(upstream, "BatchIterator", SignalledBatches)
        with pytest.raises(TrainingInterrupted) as caught:
            train_module(model, LAYOUT, EXAMPLES, "task", CONFIG, seed=3, devices=devices,
                         checkpoint_dir=ckpt)
    message = str(caught.value)
    assert message.startswith(f"module 'task' stopped by SIGTERM at step {SIGNAL_AT} of {STEPS};")
    assert str(ckpt) in message and "\n" not in message
    assert caught.value.result.checkpoint_step == SIGNAL_AT

    module, history = train_module(model, LAYOUT, EXAMPLES, "task", CONFIG, seed=3,
                                   devices=devices, checkpoint_dir=ckpt)
    assert [r["step"] for r in history] == list(range(SIGNAL_AT + 1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in history],
                               [r["loss"] for r in ref_history[SIGNAL_AT:]], rtol=0, atol=1e-5)
    want = factors(reference)
    for path, got in factors(module).items():
        np.testing.assert_allclose(got, want[path], rtol=0, atol=1e-5)

    # Saving: a folder that exists is complete; a save that fails leaves the old one untouched.
    folder = tmp_path / "modules" / "task"
    save_module(model, module, folder, base_model_name_or_path="tiny")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}

    def dies_halfway(model, directory, **kwargs):
        (directory / "adapter_config.json").parent.mkdir(parents=True)
        (directory / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr("slim_jax.models.peft_io.save_peft", dies_halfway)
    other = dataclasses.replace(module, name="other")
    with pytest.raises(KeyboardInterrupt):
        save_module(model, other, tmp_path / "modules" / "new", base_model_name_or_path="tiny")
    assert not (tmp_path / "modules" / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        save_module(model, other, folder, base_model_name_or_path="tiny")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == ["task"]
