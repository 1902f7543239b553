"""Fault injection into the LoRAHub commands: `train_lora_modules`, and `lorahub_bbh` as
`launch/tpu_pod.sh` runs it, each a real subprocess on a tiny setting
(tests/experiments/processes.py), get SIGTERM or SIGKILL at a seeded random point (after a
marker in their files, never a blind sleep) and are run again with the same command. Checked: no
process of the run outlives it (by PID), the rerun resumes instead of restarting, no finished
unit is redone, and the outputs equal an uninterrupted run's. (slim_finetune:
test_faults_slurm.py.)"""

from __future__ import annotations

import json
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = ["--upstream.num-modules", "2", "--upstream.steps", "24", "--upstream.save-every", "2",
           "--upstream.max-length", "48", "--upstream.batch-size", "2", "--upstream.num-devices",
           "1", "--upstream.heldout", "0", "--progress", "false"]
BBH = ["--bbh.tasks", "navigate,web_of_lies", "--t0.tasks", "", "--protocol.runs", "2",
       "--protocol.modules-per-run", "2", "--protocol.max-test-examples", "2",
       "--protocol.max-new-tokens", "2", "--protocol.max-length", "64", "--protocol.budget", "8",
       "--protocol.population-size", "4", "--progress", "false"]


@pytest.mark.slow
def test_train_lora_modules_and_lorahub_bbh_tpu_preemption(processes, process_env, data_args,
                                                            tmp_path):
    """Module training stopped by SIGTERM and by SIGKILL resumes to the same modules; lorahub_bbh
    launched as `launch/tpu_pod.sh` runs it on each host, pre-empted (SIGTERM) after the first
    run of its first task, resumes inside that task without redoing the run and ends with the
    uninterrupted table."""
    Run, command, stop_line = processes.Run, processes.command, processes.stop_line
    rng = random.Random(7)
    ref_modules = tmp_path / "ref_modules"
    Run(command("experiments.train_lora_modules", *MODULES, *data_args, "--out",
                str(ref_modules)), tmp_path / "m0.log", process_env).finish()
    modules = tmp_path / "modules"
    argv = command("experiments.train_lora_modules", *MODULES, *data_args, "--out",
                   str(modules))
    def at(point: int, log: Path, resumed: bool) -> bool:
        return any(processes.metrics_lines(p) >= point for p in (modules / ".partial").glob(
            "*/metrics.jsonl")) and (not resumed or "resuming" in log.read_text())

    for i, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
        log = tmp_path / f"m{i + 1}.log"
        run = Run(argv, log, process_env)
        point = rng.randint(3, 7)
        run.wait_for(lambda p=point, log=log, i=i: at(p, log, i > 0), f"module step {point}")
        code = run.signal(sig)
        assert code == (128 + sig if sig != signal.SIGKILL else -sig)
        if sig == signal.SIGTERM:
            assert "modules finished" in stop_line(tmp_path / "m1.log")
        assert not (modules / "FINISHED").exists()
    Run(argv, tmp_path / "m3.log", process_env).finish()
    manifest = json.loads((modules / "modules.json").read_text())
    assert manifest == json.loads((ref_modules / "modules.json").read_text())
    for task in manifest["tasks"]:
        name = "adapter_model.safetensors"
        assert (modules / task / name).read_bytes() == (ref_modules / task / name).read_bytes()

    bbh = [*BBH, *data_args, "--modules.dir", str(modules)]
    Run(command("experiments.lorahub_bbh", *bbh, "--out", str(tmp_path / "bbh_ref")),
        tmp_path / "b0.log", process_env).finish()
    out = tmp_path / "bbh"
    dry = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "tpu", "zone", "--", "python", "-m",
         "experiments.lorahub_bbh", *bbh, "--out", str(out)],
        env={**process_env, "DRY_RUN": "1", "REPO_DIR": str(processes.REPO)},
        cwd=processes.REPO, capture_output=True, text=True, check=True)
    remote = shlex.split(dry.stdout)[-1]  # `cd <repo> && SLIM_JAX_DISTRIBUTED=auto ... python ...`
    words = shlex.split(remote.split("&&", 1)[1])
    # One host, no pod to join here: the same python command without the auto-join variable.
    host = [sys.executable, *words[words.index("python") + 1:]]
    first = Run(host, tmp_path / "b1.log", process_env)
    partial = out / "tasks/navigate.partial.json"  # units of task x run, written atomically
    runs_saved = lambda: json.loads(partial.read_text())["runs"] if partial.is_file() else []
    first.wait_for(lambda: len(runs_saved()) == 1, "the first run of the first task")
    assert first.signal(signal.SIGTERM) == 128 + signal.SIGTERM
    line = stop_line(tmp_path / "b1.log")
    assert "0 of 2 tasks finished" in line and "navigate at run 1 of 2" in line
    kept = runs_saved()[0]
    text = Run(host, tmp_path / "b2.log", process_env).finish()
    assert "resuming: 0 of 2 tasks finished" in text
    assert "navigate continues after run 1 of 2" in text
    # The run's record as saved, its timings too: run 1 was kept, not redone.
    assert json.loads((out / "tasks/navigate.json").read_text())["runs"][0] == kept
    assert not partial.exists()
    table = lambda folder: (folder / "results.md").read_text().split("\n\n", 3)[3]
    assert table(out) == table(tmp_path / "bbh_ref")
