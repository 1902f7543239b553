"""Stop signals and worker processes for long commands: every stop request reaches every worker,
and no worker outlives the command.

- `StopSignals`: a context manager that turns SIGTERM (a job scheduler, `scancel`, a TPU VM's
  pre-emption notice), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal=USR1@T`) into one request
  to stop, read between units of work (`requested`). Inside `interruptible()` the request raises
  `Stopped` at once (for work that keeps nothing when cut short, such as evaluation). While a
  `Trainer.fit` runs, its `PreemptionGuard` owns SIGTERM; SIGINT and SIGUSR1 are passed to it, so
  the trainer saves a checkpoint at the next step whichever signal came.
- `WorkerPool`: jobs spread over spawned processes. A stop request in the parent is sent to every
  worker as SIGTERM; each worker saves where it is and reports. A worker dies with its parent,
  also when the parent is killed with SIGKILL (`prctl(PR_SET_PDEATHSIG)` on Linux, and a thread
  that watches the parent's PID everywhere): it gets SIGTERM, saves, and exits within a grace
  period.

>>> with StopSignals() as stop:
...     os.kill(os.getpid(), signal.SIGINT)
...     stop.requested
'SIGINT'
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
ORPHAN_GRACE_S = 120.0  # an orphaned worker saves and exits; past this it exits without saving


class Stopped(Exception):
    """A stop signal arrived inside `StopSignals.interruptible()`."""


class WorkerDied(RuntimeError):
    """A worker process ended without reporting its job (killed, or out of memory)."""


_ACTIVE: list[StopSignals] = []


def active() -> StopSignals | None:
    """The innermost `StopSignals` in force in this process, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


class StopSignals:
    """Context manager: SIGTERM, SIGINT and SIGUSR1 become a request to stop (see the module).

    Attributes:
      requested: the name of the first stop signal received ("SIGTERM", ...), or None.
      on_stop: callables run (in the signal handler) when the first request arrives.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.on_stop: list[Callable[[], None]] = []
        self._previous: dict[int, Any] = {}
        self._interruptible = 0

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(getattr(signal, self.requested or "SIGTERM"))

    def request(self, name: str) -> None:
        """Record a request to stop (as a signal does); the first one wins."""
        if self.requested is None:
            self.requested = name
            for callback in self.on_stop:
                callback()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)
        if signum != signal.SIGTERM:  # a trainer's guard may own SIGTERM: tell it too
            handler = signal.getsignal(signal.SIGTERM)
            if callable(handler) and handler != self._handle:
                handler(signal.SIGTERM, frame)
        if self._interruptible:
            raise Stopped(self.requested)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside, a stop request raises `Stopped` (at once if one came before)."""
        if self.requested is not None:
            raise Stopped(self.requested)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def die_with_parent(parent: int, grace_s: float = ORPHAN_GRACE_S) -> None:
    """Make this process get SIGTERM when its parent (PID `parent`, as the parent saw itself)
    dies, also by SIGKILL and also before this call, and exit at most `grace_s` seconds later
    whatever it is doing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # no-op if PR_SET_PDEATHSIG sent it already
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


@dataclasses.dataclass
class Outcome:
    """What a worker reports for one job.

    Attributes:
      job: the job's arguments, as given.
      value: the job function's return value ("done"), or None.
      status: "done" (the job function returned) or "stopped" (it raised `Stopped`).
    """

    job: tuple[Any, ...]
    value: Any = None
    status: str = "done"


def _worker_main(conn: Connection, parent: int, init: Callable[..., Any],
                 init_args: tuple[Any, ...], fn: Callable[..., Any]) -> None:
    """A worker: set up once with `init(*init_args)`, then run `fn(state, *job)` per job."""
    with StopSignals() as stop:
        die_with_parent(parent)
        try:
            with stop.interruptible():
                state = init(*init_args)
        except Stopped:
            _send(conn, ("stopped", None, None))
            return
        except Exception as err:  # reported to the parent, which raises it
            _send(conn, ("error", None, _portable(err)))
            return
        _send(conn, ("ready", None, None))
        while stop.requested is None:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            try:
                value = fn(state, *job)
            except Stopped:
                _send(conn, ("stopped", job, None))
                return
            except Exception as err:
                _send(conn, ("error", job, _portable(err)))
                return
            _send(conn, ("done", job, value))


def _send(conn: Connection, message: Any) -> None:
    """Send over a pipe whose other end may be gone (a dead parent or worker no longer
    listens; the other side learns of it by EOF)."""
    with contextlib.suppress(OSError):
        conn.send(message)


def _portable(err: BaseException) -> BaseException:
    """`err` if it pickles (so the parent re-raises the same error), else a RuntimeError with
    its traceback."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError("".join(traceback.format_exception(err)))


class WorkerPool:
    """Run jobs in `workers` spawned processes, each set up once (see the module docstring).

    Args:
      workers: how many processes.
      init: `init(*init_args) -> state`, run once in each worker (load the model, ...).
      init_args: picklable arguments of `init`.
      fn: `fn(state, *job) -> value` (module level, picklable). When a stop request cuts a job
        short, `fn` saves what it can and either returns a value that says so, or lets
        `Stopped` escape (outcome "stopped"); either way the worker then exits.
    """

    def __init__(self, workers: int, init: Callable[..., Any], init_args: tuple[Any, ...],
                 fn: Callable[..., Any]) -> None:
        self.workers, self.init, self.init_args, self.fn = workers, init, init_args, fn

    def run(self, jobs: Sequence[tuple[Any, ...]], stop: StopSignals,
            join_timeout_s: float = ORPHAN_GRACE_S) -> Iterator[Outcome]:
        """Yield each job's `Outcome` as it finishes. After a stop request no job is started,
        the running ones are told (SIGTERM) and their outcomes ("stopped" or "done") yielded.

        Raises:
          the exception a job raised (after stopping the other workers), or WorkerDied when a
          worker died without reporting.
        """
        if stop.requested:
            return
        ctx = multiprocessing.get_context("spawn")
        todo = list(jobs)
        procs: dict[Connection, Any] = {}
        running: dict[Connection, tuple[Any, ...] | None] = {}

        def tell_workers() -> None:
            for proc in procs.values():
                if proc.pid is not None and proc.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)

        stop.on_stop.append(tell_workers)
        try:
            for _ in range(min(self.workers, len(todo))):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, daemon=True,
                                   args=(child_end, os.getpid(), self.init, self.init_args,
                                         self.fn))
                proc.start()
                child_end.close()
                procs[parent_end], running[parent_end] = proc, None
            if stop.requested:
                tell_workers()
            while procs:
                ready = wait([*procs, *(p.sentinel for p in procs.values())])
                for conn in [c for c in procs if c in ready or procs[c].sentinel in ready]:
                    try:
                        kind, job, payload = conn.recv()
                    except (EOFError, OSError):
                        proc = procs.pop(conn)
                        proc.join(join_timeout_s)
                        if running.get(conn) is not None or (not stop.requested and todo):
                            raise WorkerDied(f"a worker process died (exit code "
                                             f"{proc.exitcode}) while running "
                                             f"{running.get(conn)}; its last checkpoint "
                                             "is kept") from None
                        continue
                    if kind == "error":
                        stop.on_stop.remove(tell_workers)
                        tell_workers()
                        raise payload
                    if job is not None:
                        yield Outcome(tuple(job), payload if kind == "done" else None,
                                      kind)
                    running[conn] = None
                    if kind in ("ready", "done") and todo and not stop.requested:
                        running[conn] = todo.pop(0)
                        _send(conn, running[conn])  # a worker gone meanwhile: EOF tells
                    elif kind in ("ready", "done"):
                        _send(conn, None)
        finally:
            if tell_workers in stop.on_stop:
                stop.on_stop.remove(tell_workers)
            for conn in procs:
                _send(conn, None)
            deadline = time.monotonic() + join_timeout_s
            for proc in procs.values():
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
