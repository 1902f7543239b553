"""Preemption: on a stop signal, save and stop cleanly.

The signals that mean "save and stop" (`STOP_SIGNALS`):
  - SIGTERM: `scancel`, `kill`, a job scheduler's time limit, a TPU/spot VM being reclaimed (the
    GCE maintenance notice reaches the processes as SIGTERM);
  - SIGINT: Ctrl-C (a second Ctrl-C interrupts at once with `KeyboardInterrupt`);
  - SIGUSR1: SLURM's advance warning, `sbatch --signal=B:USR1@120` (sent 120 s before the limit;
    with `--requeue` the job then starts again and resumes from the checkpoint).

One process: a handler sets a flag that the loop reads after each step. Several processes: the
signal may reach hosts at different steps (or only some hosts), so JAX's preemption sync service
(started by `jax.distributed.initialize`, which catches SIGTERM itself) agrees on one step at
which every host saves together (`multihost_utils.reached_preemption_sync_point`); SIGINT and
SIGUSR1 are handed to that service by re-sending them to the process as SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals after which a run saves a checkpoint and stops."""


class PreemptionGuard:
    """Context manager: `reached(step)` turns True once the run should save and stop.

    `signal_name` says which signal asked for it ("SIGTERM", "SIGINT", "SIGUSR1"; None before).
    Handlers are installed only from the main thread (Python's rule); elsewhere the guard never
    fires, and the signals keep their previous meaning.

    >>> import os
    >>> with PreemptionGuard() as guard:
    ...     before = guard.reached(1)
    ...     os.kill(os.getpid(), signal.SIGUSR1)
    ...     after = guard.reached(2)
    >>> before, after, guard.signal_name
    (False, True, 'SIGUSR1')
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signal_name: str | None = None
        self._flag = threading.Event()
        self._previous: dict[signal.Signals, Any] = {}

    def _multi_process(self) -> bool:
        return jax.process_count() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without waiting for the step
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """Several processes: let JAX's preemption service (which watches SIGTERM) see it."""
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._flag.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        multi = self._multi_process()
        for sig in self.signals:
            if multi and sig == signal.SIGTERM:
                continue  # jax.distributed's preemption notifier owns SIGTERM
            self._previous[sig] = signal.signal(sig, self._forward if multi else self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process must call this at every step)."""
        if self._multi_process():
            try:
                hit = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is disabled: no coordinated stop
                return False
            if hit and self.signal_name is None:
                self.signal_name = "SIGTERM"  # seen by the service (here or on another host)
            return hit
        return self._flag.is_set()
