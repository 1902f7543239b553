"""Stop signals and worker processes (`slim_jax.train.workers`): a stop request reaches every
worker, a worker reports its job or its stop, and no worker outlives its parent."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from slim_jax.train.preemption import PreemptionGuard
from slim_jax.train.workers import Stopped, StopSignals, WorkerDied, WorkerPool

REPO = Path(__file__).resolve().parents[2]


def test_every_stop_signal_is_one_request_and_interrupts_where_asked():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup / `&`
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        with StopSignals() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested == sig.name and stop.exit_code == 128 + sig
            with pytest.raises(Stopped), stop.interruptible():
                pass
    with StopSignals() as stop, pytest.raises(Stopped), stop.interruptible():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here, at once
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_ctrl_c_during_training_reaches_the_trainer_and_then_the_command():
    """A trainer's guard owns the stop signals while it trains (it saves first); the command's
    `StopSignals` learns of the stop from the trainer's result, and hears signals again after."""
    with StopSignals() as stop:
        with PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.reached(1) and guard.signal_name == "SIGINT"
        assert stop.requested is None
        stop.request(guard.signal_name)  # what slim_finetune does with `TrainResult.signal`
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGINT"  # the first request wins, the process lives on


@pytest.mark.slow
def test_pool_runs_every_job_once():
    with StopSignals() as stop:
        outcomes = list(WorkerPool(2, int, (), operator.add).run([(1,), (2,), (3,)], stop))
    assert sorted(o.value for o in outcomes) == [1, 2, 3]
    assert {o.status for o in outcomes} == {"done"}


@pytest.mark.slow
def test_a_killed_worker_is_reported():
    """The worker's job kills it (os.kill(worker's PID, SIGKILL)): reported, not waited for."""
    with StopSignals() as stop, pytest.raises(WorkerDied, match=r"exit code -9\) while running"):
        list(WorkerPool(1, os.getpid, (), os.kill).run([(signal.SIGKILL,)], stop))


@pytest.mark.slow
def test_pool_stops_its_workers_on_a_stop_request():
    """Workers busy in their set-up (an interruptible sleep of 120 s) stop within seconds."""
    start = time.monotonic()
    with StopSignals() as stop:
        timer = threading.Timer(5.0, stop.request, ("SIGTERM",))
        timer.start()
        outcomes = list(WorkerPool(2, time.sleep, (120,), operator.add).run([(1,), (2,)], stop))
        timer.join()
    assert outcomes == [] and time.monotonic() - start < 100
    assert not spawned(psutil.Process())


def spawned(process: psutil.Process) -> list[psutil.Process]:
    """The worker processes among `process`'s children (not multiprocessing's resource
    tracker, which lives as long as its parent)."""
    return [p for p in process.children() if "spawn_main" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_workers_die_with_a_killed_parent():
    script = ("import time\nfrom slim_jax.train.workers import StopSignals, WorkerPool\n"
              "with StopSignals() as stop:\n"
              "    list(WorkerPool(2, time.sleep, (300,), max).run([(1,), (2,)], stop))\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while len(workers) < 2:
        assert time.monotonic() < deadline and parent.poll() is None
        workers = spawned(psutil.Process(parent.pid))
        time.sleep(0.2)
    time.sleep(1.0)  # past die_with_parent's set-up in each worker
    tree = psutil.Process(parent.pid).children(recursive=True)
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(tree, timeout=60)
    alive = living(alive)
    for proc in alive:
        proc.kill()
    assert not alive


def living(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (an exited one its new parent has not reaped is a zombie)."""
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
