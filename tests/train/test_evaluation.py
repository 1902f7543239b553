"""Evaluation along training (`Trainer.fit(evaluate=Periodic(...))`): a curve point equals
evaluating that step's checkpoint on its own; a stopped and resumed run records each point once,
with the values of an uninterrupted run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from slim_jax.checkpoint import Checkpointer
from slim_jax.errors import ConfigError
from slim_jax.nn import inference_view
from slim_jax.train import (
    Periodic,
    Trainer,
    masked_batch_logits,
    read_metrics,
    target_cross_entropy,
)

STEPS, EVERY = 5, 2


class HeldOutLoss:
    """The inference-mode cross-entropy of a fixed batch and the step it was asked at."""

    def __init__(self, batch) -> None:
        self.batch, self.calls = batch, []

    def __call__(self, model, step):
        self.calls.append(step)
        view = inference_view(model)
        logits = masked_batch_logits(view, self.batch)
        ce = target_cross_entropy(logits, self.batch["targets"], self.batch["target_mask"])
        return {"ce": float(ce), "step_seen": step}


@pytest.fixture(scope="module")
def held_out(tiny):
    return next(tiny.batches(4, seed=99))


def _trainer(tiny, run_dir, **overrides) -> Trainer:
    config = tiny.train_config(run_dir=str(run_dir), steps=STEPS, **overrides)
    # LoRA: its inference-mode loss moves every step (SLIM's tiny model yields these held-out
    # tokens to its identity experts, so its points differ by ~1e-5)
    return Trainer(tiny.tiny_model("lora"), config, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def uninterrupted(tiny, held_out, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("curve")
    fn = HeldOutLoss(held_out)
    result = _trainer(tiny, run_dir, save_every=1, keep_checkpoints=STEPS).fit(
        tiny.batches(8), evaluate=Periodic(fn, every=EVERY))
    return run_dir, result, fn


def test_points_at_every_kth_and_the_last_step(uninterrupted):
    run_dir, result, fn = uninterrupted
    assert fn.calls == [2, 4, 5]
    assert [r["step"] for r in result.evals] == [2, 4, 5]
    on_disk = read_metrics(run_dir / "evals.jsonl")
    assert [(r["step"], r["ce"]) for r in on_disk] == [(r["step"], r["ce"]) for r in result.evals]
    assert all(r["step_seen"] == r["step"] for r in on_disk)
    assert len({r["ce"] for r in on_disk}) == 3  # the model changes between points


def test_a_point_equals_evaluating_that_steps_checkpoint(tiny, held_out, uninterrupted, tmp_path):
    run_dir, result, _ = uninterrupted
    fresh = _trainer(tiny, tmp_path)  # one trainer, each step's checkpoint restored in turn
    for record in result.evals:
        with Checkpointer(run_dir / "checkpoints") as ckpt:
            fresh.restore(ckpt, step=record["step"])
        alone = HeldOutLoss(held_out)(fresh.model(), record["step"])
        np.testing.assert_allclose(alone["ce"], record["ce"], rtol=1e-6)


@pytest.mark.parametrize("stop_at", [3, 4], ids=["between-points", "at-a-point"])
def test_stop_and_resume_records_each_point_once_with_the_same_values(
        tiny, held_out, uninterrupted, tmp_path, stop_at):
    reference = {r["step"]: r["ce"] for r in uninterrupted[1].evals}
    first = _trainer(tiny, tmp_path, save_every=1).fit(
        tiny.StopAt(tiny.batches(8), stop_at),
        evaluate=Periodic(HeldOutLoss(held_out), every=EVERY))
    assert first.stopped == "preempted" and first.step == stop_at
    # A stop is never delayed by an evaluation: step 4's point is left to the resumed run.
    assert [r["step"] for r in first.evals] == [2]
    fn = HeldOutLoss(held_out)
    second = _trainer(tiny, tmp_path, save_every=1).fit(
        tiny.batches(8), evaluate=Periodic(fn, every=EVERY))
    assert second.stopped == "completed"
    assert fn.calls == [4, 5]  # step 2 kept from the first run, not redone
    records = read_metrics(tmp_path / "evals.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5]
    for r in records:
        np.testing.assert_allclose(r["ce"], reference[r["step"]], rtol=1e-6)
    assert [r["step"] for r in second.evals] == [2, 4, 5]


def test_every_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="integer >= 1"):
        Periodic(lambda model, step: {}, every=0)
