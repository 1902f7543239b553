"""Helpers of the tests that run experiment commands as real processes (loaded by path: the
`processes` fixture of conftest.py): one command in its own session, signalled by PID, and
readers of its run folder and log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


class Run:
    """One command as a subprocess in its own session (so a signal reaches only its PID)."""

    def __init__(self, argv: list[str], log: Path, environ: dict[str, str]):
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=environ, cwd=REPO, start_new_session=True)
        self.tree: list[psutil.Process] = []

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready():
            assert self.proc.poll() is None, f"exited before {what}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {what} in {TIMEOUT_S}s"
            self.tree = psutil.Process(self.proc.pid).children(recursive=True)
            time.sleep(0.2)

    def signal(self, sig: int) -> int:
        """Send `sig` to the parent only; return its exit status; check no child survives."""
        self.tree = psutil.Process(self.proc.pid).children(recursive=True) or self.tree
        os.kill(self.proc.pid, sig)
        code = self.proc.wait(TIMEOUT_S)
        _, alive = psutil.wait_procs(self.tree, timeout=60)
        alive = living(alive)
        for proc in alive:  # a failing test leaves nothing behind
            proc.kill()
        assert not alive, f"processes outlived the command: {[p.pid for p in alive]}"
        return code

    def finish(self) -> str:
        code = self.proc.wait(TIMEOUT_S)
        text = self.log.read_text()
        assert code == 0, text
        return text


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def metrics_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def stop_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "stopped by" in line]
    assert len(lines) == 1, log.read_text()
    return lines[0]


def living(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (an exited one its new parent has not reaped is a zombie)."""
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
