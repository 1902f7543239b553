"""Faults of a `Trainer` run in a real subprocess (tests/train/fault_worker.py, 12 steps, a
checkpoint every 4): a stop signal saves where it is and exits with one line; a SIGKILL (at a
seeded step, or in the middle of a checkpoint write) loses only the steps since the last complete
checkpoint, also when checkpoints are written in the background (orbax's async path). Either
way, running it again resumes, logs each step once, and ends with the loss curve and the final
parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slim_jax.checkpoint import Checkpointer
from slim_jax.train import read_metrics

WORKER = Path(__file__).with_name("fault_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 12, 4
# Seeded: the batch draw to kill at (one point: every kill point past the first checkpoint takes
# the same path, restore the last complete checkpoint and redo the logged steps after it).
KILL_POINTS = random.Random(3).sample(range(3, STEPS + 1), 1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The workers' environment: this checkout first, one device, a shared compilation cache
    (the first worker compiles, the others load)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def start(run_dir: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), "--steps", str(STEPS),
                             "--save-every", str(SAVE_EVERY), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir: Path, env: dict, *args: str) -> tuple[int, dict | None, str]:
    """Run the worker to its end: (exit status, its JSON line or None, stderr)."""
    proc = start(run_dir, env, *args)
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


def losses(run_dir: Path) -> tuple[list[int], list[float]]:
    records = read_metrics(run_dir / "metrics.jsonl")
    return [r["step"] for r in records], [r["loss"] for r in records]


def final_params(run_dir: Path) -> list[np.ndarray]:
    with np.load(run_dir / "params.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> tuple[list[float], list[np.ndarray]]:
    """The uninterrupted run's losses and final parameters."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    rc, out, err = finish(run_dir, env)
    assert rc == 0 and out == {"stopped": "completed", "step": STEPS, "first_step": 1}, err
    steps, values = losses(run_dir)
    assert steps == list(range(1, STEPS + 1))
    return values, final_params(run_dir)


def assert_resumes_to_reference(run_dir: Path, env: dict, reference, from_step: int,
                                *args: str) -> None:
    """Run it again: it resumes after `from_step` (not from 0), logs each step once, and ends
    with the uninterrupted run's losses and parameters."""
    rc, out, err = finish(run_dir, env, *args)
    assert rc == 0, err
    assert out == {"stopped": "completed", "step": STEPS, "first_step": from_step + 1}
    steps, values = losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # each step logged once
    ref_losses, ref_params = reference
    np.testing.assert_allclose(values, ref_losses, rtol=0, atol=1e-6)
    params = final_params(run_dir)
    assert len(params) == len(ref_params)
    for got, want in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (run_dir / "loss.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("draw", KILL_POINTS)
def test_sigkill_then_rerun_resumes_from_the_last_checkpoint(env, reference, tmp_path, draw):
    rc, _, _ = finish(tmp_path, env, "--signal-at", str(draw), "--signal", "KILL")
    assert rc == -signal.SIGKILL
    done = draw - 1  # steps finished when batch `draw` was drawn
    saved = done // SAVE_EVERY * SAVE_EVERY
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == (saved or None)
    logged, _ = losses(tmp_path)
    assert logged[-1] >= saved  # steps after the checkpoint were logged: the rerun redoes them
    assert_resumes_to_reference(tmp_path, env, reference, saved)


@pytest.mark.slow
def test_each_stop_signal_saves_where_it_is_and_says_so_in_one_line(env, reference, tmp_path):
    """TERM, INT and USR1 in turn on one run: each rerun resumes from the checkpoint the previous
    signal saved and is stopped again, as the batch of its third step is drawn (that step is
    finished and saved: step 3 before any periodic checkpoint, steps 6 and 9 after one); the last
    rerun ends with the uninterrupted run's losses and parameters."""
    step = 0
    for name in ("TERM", "INT", "USR1"):
        rc, out, err = finish(tmp_path, env, "--signal-at", "3", "--signal", name)
        sig = getattr(signal, f"SIG{name}")
        first, step = step + 1, step + 3
        assert rc == 128 + sig and out == {"stopped": "preempted", "step": step,
                                           "first_step": first}, err
        line = err.strip().splitlines()[-1]
        assert re.fullmatch(rf"training stopped by SIG{name} at step {step} of {STEPS}; "
                            rf"checkpoint of step {step} saved in \S+checkpoints; run the same "
                            r"command again to resume", line)
        with Checkpointer(tmp_path / "checkpoints") as ckpt:
            assert ckpt.latest_step() == step
    assert_resumes_to_reference(tmp_path, env, reference, step)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(env, reference,
                                                                          tmp_path, mode):
    """Killed while orbax writes step 8's checkpoint: in the foreground (sync), or in its
    background thread while training goes on (async, `TrainConfig.async_checkpoint`)."""
    args = ("--async-checkpoint",) if mode == "async" else ()
    proc = start(tmp_path, env, "--pause-in-save", "8", *args)
    marker = tmp_path / "paused"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1]
    partial = Path(marker.read_text())
    assert partial.is_dir() and any(partial.iterdir())  # step 8's files are there, uncommitted
    proc.kill()
    proc.wait()
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4]  # the half-written step 8 is not listed
        assert ckpt.restore_meta()["step"] == 4
    assert_resumes_to_reference(tmp_path, env, reference, 4, *args)
    assert not partial.exists()  # the resumed run's checkpointer deleted the half-written folder
