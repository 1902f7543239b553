"""Multi-process start-up decisions (the launch itself: tests/train/test_multiprocess.py)."""

from __future__ import annotations

import pytest

from slim_jax.errors import ConfigError
from slim_jax.parallel import initialize_distributed
from slim_jax.parallel.distributed import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV


def test_single_process_without_launcher_variables(monkeypatch):
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = initialize_distributed()
    assert (info.process_index, info.process_count, info.is_leader) == (0, 1, True)
    assert info.global_devices == info.local_devices == 8


def test_a_single_process_job_is_not_distributed(monkeypatch):
    monkeypatch.setenv(COORDINATOR_ENV, "127.0.0.1:1")
    monkeypatch.setenv(NUM_PROCESSES_ENV, "1")
    monkeypatch.setenv(PROCESS_ID_ENV, "0")
    assert initialize_distributed().process_count == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({NUM_PROCESSES_ENV: "2", PROCESS_ID_ENV: "0"}, r"needs all of coordinator"),
        ({COORDINATOR_ENV: "h:1", NUM_PROCESSES_ENV: "2", PROCESS_ID_ENV: "2"},
         r"process_id 2 must lie in \[0, num_processes=2\)"),
        ({COORDINATOR_ENV: "h:1", NUM_PROCESSES_ENV: "two", PROCESS_ID_ENV: "0"},
         r"SLIM_JAX_NUM_PROCESSES='two' must be an integer"),
    ],
)
def test_inconsistent_launch_variables_are_named(monkeypatch, env, message):
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        initialize_distributed()
