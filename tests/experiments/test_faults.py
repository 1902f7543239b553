"""Fault injection: each long command runs as a real subprocess on a tiny setting, gets SIGTERM,
SIGINT or SIGKILL at a seeded random point (after a marker in its files, never a blind sleep),
and is run again with the same command. Checked: no process of the run outlives it (by PID), the
rerun resumes instead of restarting, no finished unit is redone, each training step is logged
once (SIGTERM / SIGINT), and the final tables equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
SLIM = ["--methods", "lora", "--seeds", "0,1,2", "--workers", "2", "--train.steps", "12",
        "--train.save-every", "3", "--train.log-every", "1", "--task.max-train", "32",
        "--task.max-test", "4", "--data.batch-size", "8", "--data.seq-len", "48",
        "--eval.max-length", "48", "--eval.max-new-tokens", "2", "--eval.batch-size", "4",
        "--general.num-stories", "2", "--general.story-tokens", "8", "--num-devices", "1",
        "--targets", "layers/4/self_attn/q_proj$"]
MODULES = ["--upstream.num-modules", "2", "--upstream.steps", "8", "--upstream.save-every", "2",
           "--upstream.max-length", "48", "--upstream.batch-size", "2", "--upstream.num-devices",
           "1", "--progress", "false"]
BBH = ["--bbh.tasks", "navigate,web_of_lies", "--protocol.runs", "2",
       "--protocol.modules-per-run", "2", "--protocol.max-test-examples", "2",
       "--protocol.max-new-tokens", "2", "--protocol.max-length", "64", "--protocol.budget", "8",
       "--protocol.population-size", "4", "--progress", "false"]


def env(**extra: str) -> dict[str, str]:
    """The subprocess environment: this checkout first on the path, one CPU device."""
    return {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
            **extra}


class Run:
    """One command as a subprocess in its own session (so a signal reaches only its PID)."""

    def __init__(self, argv: list[str], log: Path, environ: dict[str, str] | None = None):
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=environ or env(), cwd=REPO, start_new_session=True)
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


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


def stop_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "stopped by" in line]
    assert len(lines) == 1, log.read_text()
    return lines[0]


def slim_table(out: Path) -> list[tuple]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return [(r["method"], r["seed"], r["steps"], round(r["final_ce"], 4), r["downstream"],
             round(r["general_score"], 4), round(r["forgetting"], 4)) for r in runs]


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory) -> list[str]:
    """Data folder and one compilation cache for every run of this module (reruns compile
    nothing; the compiled programs, hence the numbers, are the same)."""
    cache = tmp_path_factory.mktemp("xla")
    return ["--data-dir", str(shared_data), "--compilation-cache", str(cache)]


@pytest.mark.slow
def test_slim_finetune_slurm_requeue_sigkill_and_ctrl_c(data, tmp_path):
    """SLURM's time limit (SIGTERM, `--signal=TERM@120`) then `--requeue` (the same srun
    command again), a SIGKILL of the parent, a Ctrl-C; the fourth run finishes."""
    rng = random.Random(11)
    ref = Run(command("experiments.slim_finetune", *SLIM, *data, "--out", str(tmp_path / "ref")),
              tmp_path / "ref.log")
    ref.finish()
    out = tmp_path / "run"
    argv = command("experiments.slim_finetune", *SLIM, *data, "--out", str(out))
    seed0 = out / "runs/lora/seed0"
    slurm = env(SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")

    first = Run(argv, tmp_path / "1.log", slurm)
    point = rng.randint(2, 8)
    first.wait_for(lambda: metrics_lines(seed0 / "metrics.jsonl") >= point, f"step {point}")
    assert first.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    line = stop_line(tmp_path / "1.log")
    assert "saved: 0 of 3 runs finished" in line and "resume with: " in line
    assert shlex.split(line.split("resume with: ")[1])[3:] == argv[3:]
    assert steps_logged(seed0) == list(range(1, len(steps_logged(seed0)) + 1))

    requeued = Run(argv, tmp_path / "2.log", {**slurm, "SLURM_RESTART_COUNT": "1"})
    requeued.wait_for(lambda: (seed0 / "result.json").is_file(), "a finished run")
    finished = (seed0 / "result.json").stat().st_mtime_ns
    assert "resuming from its checkpoint" in (tmp_path / "2.log").read_text()
    assert requeued.signal(signal.SIGKILL) == -signal.SIGKILL

    logged = {p: metrics_lines(p) for p in out.glob("runs/lora/seed*/metrics.jsonl")}
    third = Run(argv, tmp_path / "3.log")
    third.wait_for(lambda: any(metrics_lines(p) > logged.get(p, 0)
                               for p in out.glob("runs/lora/seed*/metrics.jsonl")
                               if not (p.parent / "result.json").exists()),
                   "an unfinished run's next step")
    assert third.signal(signal.SIGINT) == 128 + signal.SIGINT
    assert "stopped by SIGINT" in stop_line(tmp_path / "3.log")

    done = {p: p.stat().st_mtime_ns for p in out.glob("runs/lora/seed*/result.json")}
    text = Run(argv, tmp_path / "4.log").finish()
    assert f"resuming: {len(done)} of 3 runs finished" in text
    assert (seed0 / "result.json").stat().st_mtime_ns == finished
    for path, mtime in done.items():  # finished runs are not redone
        assert path.stat().st_mtime_ns == mtime
        assert f"[lora {path.parent.name.replace('seed', 'seed ')}]" not in text
    assert slim_table(out) == slim_table(tmp_path / "ref")
    for seed in range(3):  # each step once, also after the SIGKILL (metrics cut to the restore)
        assert steps_logged(out / f"runs/lora/seed{seed}") == list(range(1, 13))
    # A finished run folder is refused, not overwritten.
    again = subprocess.run(argv, env=env(), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "holds a finished run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_lora_modules_and_lorahub_bbh_tpu_preemption(data, tmp_path):
    """Module training stopped by SIGTERM and by SIGKILL resumes to the same modules; lorahub_bbh
    launched as `launch/tpu_pod.sh` runs it on each host, pre-empted (SIGTERM) after the first
    run of its first task, resumes inside that task without redoing the run and ends with the
    uninterrupted table."""
    rng = random.Random(7)
    ref_modules = tmp_path / "ref_modules"
    Run(command("experiments.train_lora_modules", *MODULES, *data, "--out", str(ref_modules)),
        tmp_path / "m0.log").finish()
    modules = tmp_path / "modules"
    argv = command("experiments.train_lora_modules", *MODULES, *data, "--out", str(modules))
    def at(point: int, log: Path, resumed: bool) -> bool:
        return any(metrics_lines(p) >= point for p in (modules / ".partial").glob(
            "*/metrics.jsonl")) and (not resumed or "resuming" in log.read_text())

    for i, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
        log = tmp_path / f"m{i + 1}.log"
        run = Run(argv, log)
        point = rng.randint(3, 7)
        run.wait_for(lambda p=point, log=log, i=i: at(p, log, i > 0), f"module step {point}")
        code = run.signal(sig)
        assert code == (128 + sig if sig != signal.SIGKILL else -sig)
        if sig == signal.SIGTERM:
            assert "modules finished" in stop_line(tmp_path / "m1.log")
        assert not (modules / "FINISHED").exists()
    Run(argv, tmp_path / "m3.log").finish()
    manifest = json.loads((modules / "modules.json").read_text())
    assert manifest == json.loads((ref_modules / "modules.json").read_text())
    for task in manifest["tasks"]:
        name = "adapter_model.safetensors"
        assert (modules / task / name).read_bytes() == (ref_modules / task / name).read_bytes()

    bbh = [*BBH, *data, "--modules.dir", str(modules)]
    Run(command("experiments.lorahub_bbh", *bbh, "--out", str(tmp_path / "bbh_ref")),
        tmp_path / "b0.log").finish()
    out = tmp_path / "bbh"
    dry = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "tpu", "zone", "--", "python", "-m",
         "experiments.lorahub_bbh", *bbh, "--out", str(out)],
        env=env(DRY_RUN="1", REPO_DIR=str(REPO)), cwd=REPO, capture_output=True, text=True,
        check=True)
    remote = shlex.split(dry.stdout)[-1]  # `cd <repo> && SLIM_JAX_DISTRIBUTED=auto ... python ...`
    words = shlex.split(remote.split("&&", 1)[1])
    # One host, no pod to join here: the same python command without the auto-join variable.
    host = [sys.executable, *words[words.index("python") + 1:]]
    first = Run(host, tmp_path / "b1.log")
    partial = out / "tasks/navigate.partial.json"  # units of task x run, written atomically
    runs_saved = lambda: json.loads(partial.read_text())["runs"] if partial.is_file() else []
    first.wait_for(lambda: len(runs_saved()) == 1, "the first run of the first task")
    assert first.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    line = stop_line(tmp_path / "b1.log")
    assert "0 of 2 tasks finished" in line and "navigate at run 1 of 2" in line
    kept = runs_saved()[0]
    text = Run(host, tmp_path / "b2.log").finish()
    assert "resuming: 0 of 2 tasks finished" in text
    assert "navigate continues after run 1 of 2" in text
    # The run's record as saved, its timings too: run 1 was kept, not redone.
    assert json.loads((out / "tasks/navigate.json").read_text())["runs"][0] == kept
    assert not partial.exists()
    table = lambda folder: (folder / "results.md").read_text().split("\n\n", 3)[3]
    assert table(out) == table(tmp_path / "bbh_ref")


def living(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (an exited one its new parent has not reaped is a zombie)."""
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
