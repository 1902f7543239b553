"""The benchmark harness: its round-robin order, its busy check, its statistics. No timing."""

from __future__ import annotations

import argparse
import doctest
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
_spec = importlib.util.spec_from_file_location("benchmarks_harness", _PATH)
harness = importlib.util.module_from_spec(_spec)
sys.modules["benchmarks_harness"] = harness
_spec.loader.exec_module(harness)


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser, repeats=3)
    return parser.parse_args([f"--{k.replace('_', '-')}={v}" if v is not True
                              else f"--{k.replace('_', '-')}" for k, v in kw.items()])


def test_interleave_round_robin_with_rotated_start():
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = harness.interleave(fns, repeats=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: each function in turn
    assert calls[6:] == list("abc" "bca" "cab" "abc")  # one call of each per round, rotated
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_interleave_times_each_call_with_the_clock():
    ticks = itertools.count()
    times = harness.interleave({"x": lambda: None, "y": lambda: None}, repeats=2, warmup=0,
                               clock=lambda: float(next(ticks)))
    assert times == {"x": [1.0, 1.0], "y": [1.0, 1.0]}


def test_busy_machine_is_refused_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(harness, "load_average", lambda: (3.0, 2.0, 1.0))
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "pin_threads", lambda threads: pytest.fail("pinned when busy"))
    with pytest.raises(SystemExit, match=r"machine busy: 1-min load average 3.00 > 0.50 "
                                         r"\(2 cores x 0.25\).*--allow-busy"):
        harness.start(_args(), script="x/bench.py", argv=[])


def test_busy_machine_is_waited_for(monkeypatch, capsys):
    loads = iter([(3.0, 2.0, 1.0), (1.0, 2.0, 1.0), (0.4, 2.0, 1.0)])
    sleeps: list[float] = []
    monkeypatch.setattr(harness, "load_average", lambda: next(loads))
    monkeypatch.setattr(harness.time, "sleep", sleeps.append)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "pin_threads", lambda threads: 2)
    ctx = harness.start(_args(wait_idle=60), script="x/bench.py", argv=[])
    assert ctx.busy is None and ctx.load_before[0] == 0.4 and sleeps == [10.0, 10.0]
    assert "waiting up to 60 s" in capsys.readouterr().out


def test_busy_machine_allowed_marks_rows(monkeypatch, capsys):
    monkeypatch.setattr(harness, "load_average", lambda: (3.0, 2.0, 1.0))
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "pin_threads", lambda threads: 2)
    ctx = harness.start(_args(allow_busy=True), script="x/bench.py", argv=["--allow-busy"])
    assert "BUSY machine" in capsys.readouterr().out
    row = ctx.table([harness.compare("step", {"a": [1.0], "b": [2.0]}, "a", "b")])
    assert "| BUSY 3.00 -> 3.00 |" in row
    assert "`python benchmarks/bench.py --allow-busy`" in row  # the command is in the row


def test_idle_machine_starts_unmarked(monkeypatch, capsys):
    monkeypatch.setattr(harness, "load_average", lambda: (0.4, 0.3, 0.2))
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "pin_threads", lambda threads: 2)
    ctx = harness.start(_args(), script="x/bench.py", argv=[])
    assert ctx.busy is None and "BUSY" not in capsys.readouterr().out
    assert "BUSY" not in ctx.table([harness.compare("s", {"a": [1.0], "b": [1.0]}, "a", "b")])


def test_busy_threshold_is_configurable(monkeypatch):
    monkeypatch.setattr(harness, "load_average", lambda: (0.9, 0.0, 0.0))
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    monkeypatch.setattr(harness.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(harness, "pin_threads", lambda threads: 2)
    assert harness.start(_args(busy_per_core=0.5), script="x/bench.py", argv=[]).busy is None
    with pytest.raises(SystemExit, match="machine busy"):
        harness.start(_args(busy_per_core=0.25), script="x/bench.py", argv=[])


def test_compare_uses_per_round_ratios():
    c = harness.compare("fwd", {"ours": [1.0, 2.0, 1.0], "torch": [2.0, 2.0, 3.0]}, "ours",
                        "torch", work=6000)
    assert (c.speedup, c.speedup_min, c.speedup_max) == (2.0, 1.0, 3.0)
    assert c.a_text == "6,000 [4,000-6,000] /s"
    assert "RATIO fwd: ours is 2.00x torch" in c.line()


def test_doctests():
    assert doctest.testmod(harness, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_read_bandwidth_is_bytes_over_the_fastest_round(monkeypatch):
    def rounds(fns, repeats):
        assert float(fns["sum"]()) == 4 * 2**20 / 4  # the call sums every element once
        return {"sum": [0.5, 0.25, 1.0][:repeats]}

    monkeypatch.setattr(harness, "interleave", rounds)
    # 4 MiB read in 0.25 s at best: 16 MiB/s.
    assert harness.read_bandwidth(mib=4, repeats=3) == 4 * 2**20 / 0.25
