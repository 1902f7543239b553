"""Kill after step k (SIGTERM), resume: the loss curve continues as if never interrupted; the
checkpoint written on 8 devices restores on 1; metrics, plot and keep-N along the way."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from slim_jax.checkpoint import Checkpointer
from slim_jax.parallel import MeshConfig
from slim_jax.train import Trainer, read_metrics

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

STEPS, KILL_AT = 4, 2


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    config = tiny.train_config(run_dir=str(run_dir), save_every=1, keep_checkpoints=2,
                               async_checkpoint=True)
    trainer = Trainer(tiny.tiny_model(), config, devices=jax.devices()[:1])
    return run_dir, trainer.fit(tiny.batches(8))


@pytest.mark.slow
def test_uninterrupted_run_writes_metrics_plot_and_keeps_n(uninterrupted):
    run_dir, result = uninterrupted
    assert result.stopped == "completed" and result.step == STEPS
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == _losses(result)
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    assert all("tokens_per_s" in r for r in records[1:])  # the first step includes compilation
    assert (run_dir / "loss.png").stat().st_size > 0
    with Checkpointer(run_dir / "checkpoints") as ckpt:  # saved every step, kept the newest 2
        assert ckpt.all_steps() == [STEPS - 1, STEPS]


@pytest.mark.slow
def test_sigterm_then_resume_on_another_mesh_continues_the_curve(tiny, uninterrupted, tmp_path):
    reference = _losses(uninterrupted[1])

    # Killed run, on 8 devices: SIGTERM while step KILL_AT runs -> it saves that step and stops.
    killed = Trainer(tiny.tiny_model(), tiny.train_config(
        MeshConfig(data=2, fsdp=2, tensor=2), run_dir=str(tmp_path)))
    result = killed.fit(tiny.StopAt(tiny.batches(8), KILL_AT))
    assert result.stopped == "preempted" and result.step == KILL_AT
    assert result.checkpoint_step == KILL_AT
    np.testing.assert_allclose(_losses(result), reference[:KILL_AT], atol=1e-5, rtol=0)

    # Resumed on 1 device from the 8-device checkpoint: state restored bit for bit ...
    resumed = Trainer(tiny.tiny_model(), tiny.train_config(run_dir=str(tmp_path)),
                      devices=jax.devices()[:1])
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        meta = resumed.restore(ckpt)
    assert meta["step"] == KILL_AT and meta["data_position"]["index"] > 0
    for a, b in zip(jax.tree.leaves(killed.state), jax.tree.leaves(resumed.state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
        assert len(b.sharding.device_set) == 1

    # ... and the loss curve goes on where the uninterrupted run's did (data position included).
    result = resumed.fit(tiny.batches(8))
    assert result.stopped == "completed" and result.step == STEPS
    assert [r["step"] for r in result.history] == list(range(KILL_AT + 1, STEPS + 1))
    np.testing.assert_allclose(_losses(result), reference[KILL_AT:], atol=1e-5, rtol=0)
