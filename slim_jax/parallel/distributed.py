"""Multi-process start-up: join the `jax.distributed` job when launched as several processes.

Call `initialize_distributed()` first thing in a program (before any JAX computation). It decides
from its arguments, then the environment, whether this process is one of several:

1. explicit arguments, or the variables the local launcher (`launch/local.py`) sets:
   `SLIM_JAX_COORDINATOR` (host:port of process 0), `SLIM_JAX_NUM_PROCESSES`, `SLIM_JAX_PROCESS_ID`;
2. `SLIM_JAX_DISTRIBUTED=auto` (set by `launch/tpu_pod.sh`): JAX detects a Cloud TPU pod itself;
3. a SLURM job step with more than one task (`SLURM_NTASKS > 1`, `launch/slurm_gpu.sbatch`): JAX
   reads the SLURM variables, one process per GPU;
4. otherwise a single process: nothing to do.

Then, when the launcher said which platform the job runs on (`SLIM_JAX_EXPECT_PLATFORM`: `tpu`
from `launch/tpu_pod.sh`, `gpu` from `launch/slurm_gpu.sbatch`, `cpu` from `launch/local.py`),
it checks that JAX's devices are of that platform (`check_platform`): a TPU VM with a CPU-only
jax would otherwise train on the hosts' CPUs. The launchers also run that check first, alone:
`python launch/check_platform.py tpu` prints one line and exits 1 when it fails.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from slim_jax.errors import ConfigError

COORDINATOR_ENV = "SLIM_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "SLIM_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SLIM_JAX_PROCESS_ID"
AUTO_ENV = "SLIM_JAX_DISTRIBUTED"
EXPECT_ENV = "SLIM_JAX_EXPECT_PLATFORM"
# How to get JAX for each platform (the pyproject extras).
_INSTALL = {
    "tpu": "pip install -e '.[tpu]' (jax[tpu] brings libtpu)",
    "gpu": "pip install -e '.[cuda]' (jax[cuda12]), with an NVIDIA driver",
    "cpu": "set JAX_PLATFORMS=cpu",
}


class PlatformError(ConfigError):
    """JAX's devices are not of the platform the launcher expects."""


def check_platform(expected: str | None = None) -> None:
    """Raise `PlatformError` unless JAX's devices are of platform `expected` (`tpu`, `gpu`,
    `cpu`); default `$SLIM_JAX_EXPECT_PLATFORM`, and no check when neither is set.

    >>> check_platform("cpu")
    >>> check_platform("tpu")
    Traceback (most recent call last):
    ...
    slim_jax.parallel.distributed.PlatformError: expected tpu devices but JAX sees ...
    """
    expected = expected or os.environ.get(EXPECT_ENV) or None
    if expected is None:
        return
    if expected not in _INSTALL:
        raise PlatformError(f"{EXPECT_ENV}={expected!r}: expected one of {', '.join(_INSTALL)}")
    device = jax.devices()[0]
    if device.platform != expected:
        raise PlatformError(
            f"expected {expected} devices but JAX sees {jax.device_count()} "
            f"{device.platform} device(s) ({device.device_kind}): {_INSTALL[expected]}")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int

    @property
    def is_leader(self) -> bool:
        """True on process 0, the one that prints progress and writes metrics."""
        return self.process_index == 0


def process_info() -> ProcessInfo:
    """This process's index and count, and its local and global device counts.

    >>> info = process_info()
    >>> info.process_count, info.is_leader
    (1, True)
    """
    return ProcessInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from None


def _enable_cpu_collectives() -> None:
    # Cross-process collectives on CPU (the local launcher, CI) need an implementation; gloo is
    # the default of recent JAX releases and is set here for older ones. Accelerators ignore it.
    if not getattr(jax.config, "jax_cpu_collectives_implementation", None):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> ProcessInfo:
    """Join the multi-process job if this is one (see the module docstring); returns where we stand.

    Args:
      coordinator: `host:port` of process 0's coordination service.
      num_processes: how many processes the job has.
      process_id: this process's index, `0 <= process_id < num_processes`.
      timeout_s: how long to wait for every process to join.

    Raises:
      ConfigError: when only some of the three are given, or they are inconsistent.

    >>> initialize_distributed().process_count  # no launcher variables: a single process
    1
    """
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    num_processes = num_processes if num_processes is not None else _int_env(NUM_PROCESSES_ENV)
    process_id = process_id if process_id is not None else _int_env(PROCESS_ID_ENV)
    explicit = (coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        return process_info()
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError(
                f"multi-process launch needs all of coordinator, num_processes and process_id "
                f"(or {COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}); got "
                f"coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}"
            )
        if not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise ConfigError(
                f"process_id {process_id} must lie in [0, num_processes={num_processes})"
            )
        if num_processes > 1:  # type: ignore[operator]
            _enable_cpu_collectives()
            jax.distributed.initialize(
                coordinator, num_processes, process_id, initialization_timeout=timeout_s
            )
    elif os.environ.get(AUTO_ENV, "").lower() == "auto" or (_int_env("SLURM_NTASKS") or 1) > 1:
        # Cloud TPU pods and SLURM: JAX reads coordinator, count and index from the environment.
        jax.distributed.initialize(initialization_timeout=timeout_s)
    check_platform()
    return process_info()


def leader_time() -> int:
    """Process 0's wall clock in whole seconds since the epoch, the same value on every process.

    For names every process must agree on, such as a timestamped run folder: the processes'
    own clocks may differ by seconds. In a multi-process job every process must call it (it is
    a collective).

    >>> abs(leader_time() - time.time()) < 2  # a single process: its own clock
    True
    """
    now = int(time.time())
    if jax.process_count() == 1:
        return now
    from jax.experimental import multihost_utils

    # Two int32 halves: 64-bit integers would need jax_enable_x64.
    high, low = multihost_utils.broadcast_one_to_all(np.array([now >> 16, now & 0xFFFF], np.int32))
    return (int(high) << 16) | int(low)

