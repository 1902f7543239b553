"""Fault injection into `slim_finetune` as SLURM runs it: the command runs as a real subprocess
on a tiny setting (tests/experiments/processes.py), gets SIGTERM, SIGKILL and SIGINT at a seeded
random point (after a marker in its files, never a blind sleep), and is run again with the same
command. Checked: no process of the run outlives it (by PID), the rerun resumes instead of
restarting, no finished run is redone, each training step is logged once, and the final table
equals an uninterrupted run's. (The LoRAHub commands: test_faults_tpu.py.)"""

from __future__ import annotations

import json
import random
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

SLIM = ["--methods", "lora", "--seeds", "0,1,2", "--workers", "2", "--train.steps", "12",
        "--train.save-every", "3", "--train.log-every", "1", "--task.max-train", "32",
        "--task.max-test", "4", "--data.batch-size", "8", "--data.seq-len", "48",
        "--eval.max-length", "48", "--eval.max-new-tokens", "2", "--eval.batch-size", "4",
        "--general.num-stories", "2", "--general.story-tokens", "8", "--num-devices", "1",
        "--targets", "layers/4/self_attn/q_proj$"]


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


def slim_table(out: Path) -> list[tuple]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return [(r["method"], r["seed"], r["steps"], round(r["final_ce"], 4), r["downstream"],
             round(r["general_score"], 4), round(r["forgetting"], 4)) for r in runs]


@pytest.mark.slow
def test_slim_finetune_slurm_requeue_sigkill_and_ctrl_c(processes, process_env, data_args,
                                                         tmp_path):
    """SLURM's time limit (SIGTERM, `--signal=TERM@120`) then `--requeue` (the same srun
    command again), a SIGKILL of the parent, a Ctrl-C; the fourth run finishes."""
    Run, metrics_lines, stop_line = processes.Run, processes.metrics_lines, processes.stop_line
    rng = random.Random(11)
    ref = Run(processes.command("experiments.slim_finetune", *SLIM, *data_args, "--out",
                                str(tmp_path / "ref")), tmp_path / "ref.log", process_env)
    ref.finish()
    out = tmp_path / "run"
    argv = processes.command("experiments.slim_finetune", *SLIM, *data_args, "--out", str(out))
    seed0 = out / "runs/lora/seed0"
    slurm = {**process_env, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}

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
    third = Run(argv, tmp_path / "3.log", process_env)
    third.wait_for(lambda: any(metrics_lines(p) > logged.get(p, 0)
                               for p in out.glob("runs/lora/seed*/metrics.jsonl")
                               if not (p.parent / "result.json").exists()),
                   "an unfinished run's next step")
    assert third.signal(signal.SIGINT) == 128 + signal.SIGINT
    assert "stopped by SIGINT" in stop_line(tmp_path / "3.log")

    done = {p: p.stat().st_mtime_ns for p in out.glob("runs/lora/seed*/result.json")}
    text = Run(argv, tmp_path / "4.log", process_env).finish()
    assert f"resuming: {len(done)} of 3 runs finished" in text
    assert (seed0 / "result.json").stat().st_mtime_ns == finished
    for path, mtime in done.items():  # finished runs are not redone
        assert path.stat().st_mtime_ns == mtime
        assert f"[lora {path.parent.name.replace('seed', 'seed ')}]" not in text
    assert slim_table(out) == slim_table(tmp_path / "ref")
    for seed in range(3):  # each step once, also after the SIGKILL (metrics cut to the restore)
        assert steps_logged(out / f"runs/lora/seed{seed}") == list(range(1, 13))
    # A finished run folder is refused, not overwritten.
    again = subprocess.run(argv, env=process_env, cwd=processes.REPO, capture_output=True,
                           text=True)
    assert again.returncode == 2 and "holds a finished run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
