"""Two local processes (launch/local.py, jax.distributed over loopback) reach the same losses as
one process for 3 steps (issue 4), and write one checkpoint together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from slim_jax.parallel import MeshConfig
from slim_jax.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("mp_worker.py")


def _start(out: Path, processes: int, devices_per_process: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    command = [sys.executable, str(ROOT / "launch" / "local.py"), "-n", str(processes),
               "--devices-per-process", str(devices_per_process), "--",
               sys.executable, str(WORKER), str(out)]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-4000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_reach_the_losses_of_one(tiny, tmp_path):
    job = _start(tmp_path, processes=2, devices_per_process=2)  # runs while this one trains
    try:
        # One process, the same mesh shape: data=4 over 4 of this process's devices.
        trainer = Trainer(tiny.tiny_model("lora"), tiny.train_config(MeshConfig(data=4), steps=3),
                          devices=jax.devices()[:4])
        single = [r["loss"] for r in trainer.fit(tiny.batches(8)).history]
    finally:
        _finish(job)
    first, second = (json.loads((tmp_path / f"losses_{i}.json").read_text()) for i in (0, 1))

    assert (first["process_count"], first["devices"], first["local_devices"]) == (2, 4, 2)
    assert len(single) == 3
    np.testing.assert_allclose(first["losses"], single, atol=1e-5, rtol=0)
    assert first["losses"] == second["losses"]  # every process sees the same global step
    # leader_time: process 0's clock on both, though process 1 read it 2 s later.
    assert first["leader_time"] == second["leader_time"] <= second["own_time"] - 1
    assert first["checkpoint_step"] == 3 and (tmp_path / "run" / "checkpoints" / "3").is_dir()
