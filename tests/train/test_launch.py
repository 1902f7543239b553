"""The launchers: the local one's environment and failure handling, the pod/cluster scripts'
syntax and the command the TPU launcher sends to every worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def _local(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCH / "local.py"), *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.multiprocess
def test_local_launcher_gives_each_process_its_rank_and_devices(tmp_path):
    out = str(tmp_path)
    show = (f"import os; e = os.environ; open(os.path.join({out!r}, e['SLIM_JAX_PROCESS_ID']), "
            "'w').write(' '.join([e['SLIM_JAX_NUM_PROCESSES'], e['SLIM_JAX_COORDINATOR'], "
            "e['JAX_PLATFORMS'], e['XLA_FLAGS']]))")
    done = _local("-n", "3", "--devices-per-process", "2", "--", sys.executable, "-c", show)
    assert done.returncode == 0, done.stderr
    seen = {p.name: p.read_text().split() for p in tmp_path.iterdir()}
    assert sorted(seen) == ["0", "1", "2"]
    assert {v[0] for v in seen.values()} == {"3"}
    assert len({v[1] for v in seen.values()}) == 1  # one coordinator ...
    assert seen["0"][1].startswith("127.0.0.1:")  # ... on loopback
    assert all(v[2] == "cpu" and v[-1] == "--xla_force_host_platform_device_count=2"
               for v in seen.values())


@pytest.mark.multiprocess
def test_local_launcher_stops_the_job_when_a_process_fails():
    fail_one = ("import os, sys, time; rank = os.environ['SLIM_JAX_PROCESS_ID']; "
                "sys.exit(3) if rank == '1' else time.sleep(60)")
    done = _local("-n", "2", "--", sys.executable, "-c", fail_one)
    assert done.returncode == 3
    assert _local("-n", "2").returncode == 2  # no command: a usage error


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pod_and_cluster_scripts():
    for script in ("tpu_pod.sh", "slurm_gpu.sbatch"):
        subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    env = dict(os.environ, DRY_RUN="1", SLIM_JAX_DATA_DIR="/mnt/data")
    done = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "my-pod", "us-central2-b", "--", "python", "-m",
         "experiments.slim_finetune", "--steps", "10"],
        env=env, capture_output=True, text=True, check=True)
    command = done.stdout.strip()
    assert command.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b")
    assert "--worker=all" in command
    for part in ("SLIM_JAX_DISTRIBUTED=auto", "SLIM_JAX_DATA_DIR=/mnt/data",
                 "python\\ -m\\ experiments.slim_finetune\\ --steps\\ 10"):
        assert part in command
    usage = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "only-one-arg"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "--worker" not in usage.stdout
