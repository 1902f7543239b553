"""Preemption: on SIGTERM (a TPU/spot VM being reclaimed, `scancel`), save and stop cleanly.

One process: a SIGTERM handler sets a flag that the loop reads after each step. Several
processes: the signal may reach hosts at different steps, so JAX's preemption sync service (started
by `jax.distributed.initialize`, which catches SIGTERM itself) agrees on one step at which every
host saves together (`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Context manager: `reached(step)` turns True once the run should save and stop.

    >>> import os
    >>> with PreemptionGuard() as guard:
    ...     before = guard.reached(1)
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     after = guard.reached(2)
    >>> before, after
    (False, True)
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False

    def _multi_process(self) -> bool:
        return jax.process_count() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._flag.set()

    def __enter__(self) -> PreemptionGuard:
        in_main_thread = threading.current_thread() is threading.main_thread()
        if not self._multi_process() and in_main_thread:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process must call this at every step)."""
        if self._multi_process():
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is disabled: no coordinated stop
                return False
        return self._flag.is_set()
