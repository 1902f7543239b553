"""The stop signals reach the training loop: SIGTERM, SIGINT (twice: at once), SLURM's SIGUSR1;
with several processes SIGINT and SIGUSR1 are handed to JAX's preemption service as SIGTERM."""

from __future__ import annotations

import os
import signal

import pytest

from slim_jax.train import preemption
from slim_jax.train.preemption import STOP_SIGNALS, PreemptionGuard


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_each_stop_signal_stops_after_the_step_and_handlers_are_restored(sig):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with PreemptionGuard() as guard:
        assert not guard.reached(1)
        os.kill(os.getpid(), sig)
        assert guard.reached(2) and guard.signal_name == sig.name
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_a_second_ctrl_c_interrupts_at_once():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.reached(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_several_processes_hand_sigint_and_sigusr1_to_the_preemption_service(monkeypatch):
    """JAX's service (here a stand-in SIGTERM handler) sees the signal; the sync point decides."""
    seen = []
    monkeypatch.setattr(PreemptionGuard, "_multi_process", lambda self: True)
    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                        lambda step: bool(seen) and step >= 3)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionGuard() as guard:
            assert signal.getsignal(signal.SIGTERM) is not guard._handle  # left to the service
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [signal.SIGTERM]
            assert not guard.reached(2)  # the hosts agree on a later step
            assert guard.reached(3) and guard.signal_name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGTERM, previous)
