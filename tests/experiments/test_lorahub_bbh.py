"""`python -m experiments.lorahub_bbh` and `experiments.train_lora_modules`: help, one-line errors
for bad input, and a tiny run end to end on the TinyStories model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from experiments import lorahub_bbh, train_lora_modules
from slim_jax.data import load_t0_target
from slim_jax.lorahub import load_module
from slim_jax.models.llama2c import load_llama2c

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: whole commands
TASKS = ("qasc_qa_with_separated_facts_3", "wiki_hop_original_choose_best_object_affirmative_1")
T0_TARGET = "amazon_polarity_Is_this_product_review_positive"  # unseen: not a LoRAHub module


def run(main, capsys, *args: str) -> tuple[int, str]:
    """`main(args)` without JAX's persistent compilation cache (a process-wide setting that the
    CLIs turn on by default): `(exit status, stderr)`."""
    code = main([*args, "--compilation-cache", "none"])
    return code, capsys.readouterr().err


def test_help_lists_every_field_with_its_default(capsys):
    assert lorahub_bbh.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--protocol.budget" in out and "default: 40" in out
    assert "--data-dir" in out and "--bbh.tasks" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--bbh.tasks", "navigat"], "'navigat' is not a BIG-Bench Hard task; did you mean "
                                 "['navigate']?"),
    (["--bbh.tasks", "navigate", "--protocol.k", "300"],
     "K=300 ADAPT examples requested but the task has 250"),
    (["--protocol.budget", "4", "--protocol.population-size", "8", "--protocol.search", "cmaes"],
     "a budget of 4 evaluations is smaller than one generation of population_size=8"),
    (["--protocol.budget", "24", "--protocol.search", "singles_cmaes"],
     "a budget of 24 evaluations is smaller than the 'singles' start's 20 single-module "
     "evaluations (N=20) plus one generation of population_size=8; give budget >= 28"),
    (["--out", "{file}"], "is a file; give a folder"),
    (["--out", "/proc/no/such"], "--out /proc/no/such: cannot create or write in /proc"),
    (["--bbh.tasks", "", "--t0.tasks", ""], "no task to run: give --bbh.tasks or --t0.tasks"),
    (["--t0.tasks", "quoref_What_Is_The_Answer"], "distinct completions, more than "
                                                  "max_classes=20"),
    (["--t0.tasks", "amazon_polarity_flattering_or_not"],
     "--t0.tasks: 'amazon_polarity_flattering_or_not' is one of the module library's tasks; an "
     "unseen target must be left out of the library"),
])
def test_bad_input_is_one_line(args, message, capsys, shared_data, tmp_path):
    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    code, err = run(lorahub_bbh.main, capsys, "--data-dir", str(shared_data),
                    "--modules.dir", str(tmp_path), "--progress", "false", *args)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err and err.startswith("python -m experiments.lorahub_bbh: error:")


def test_missing_modules_name_the_training_command(capsys, shared_data, tmp_path):
    code, err = run(lorahub_bbh.main, capsys, "--data-dir", str(shared_data), "--modules.dir",
                    str(tmp_path / "none"), "--modules.train-missing", "false", "--progress",
                    "false")
    assert code == 2 and "python -m experiments.train_lora_modules --out" in err


def test_modules_of_different_ranks_are_named(capsys, shared_data, tmp_path, write_peft_modules):
    write_peft_modules(tmp_path, TASKS, ranks=(2, 4), random_b=False)
    code, err = run(lorahub_bbh.main, capsys, "--data-dir", str(shared_data), "--modules.dir",
                    str(tmp_path), "--protocol.modules-per-run", "2", "--protocol.runs", "1",
                    "--progress", "false")
    assert code == 2 and err.count("\n") == 1
    assert "has rank 4" in err and "has rank 2: all modules must have the same rank" in err


def test_train_lora_modules_writes_peft_modules(capsys, shared_data, tmp_path):
    out = tmp_path / "modules"
    args = ["--data-dir", str(shared_data), "--progress", "false", "--upstream.num-modules", "1",
            "--upstream.steps", "2", "--upstream.max-length", "64", "--upstream.num-devices", "1",
            "--upstream.heldout", "3", "--out", str(out)]
    code, err = run(train_lora_modules.main, capsys, *args)
    assert code == 0, err
    manifest = json.loads((out / "modules.json").read_text())
    record = manifest["losses"][TASKS[0]]
    assert manifest["tasks"] == [TASKS[0]] and record["steps"] == 2 and record["heldout"] == 3
    assert 0.0 <= record["heldout_accuracy"] <= 100.0 and 0.0 <= record["heldout_majority"] <= 100
    assert f"| {TASKS[0]} | 2 | " in (out / "modules.md").read_text()
    model, _ = load_llama2c(shared_data / "tinystories260k" / "checkpoint_v1.bin")
    module = load_module(out / TASKS[0], model)
    assert (module.rank, module.alpha) == (16, 32.0)
    assert len(module.paths) == 10 and module.paths[0] == "layers/0/self_attn/q_proj"
    assert any(np.abs(b).max() > 0 for _, b in module.factors.values())  # B was trained
    assert (out / "FINISHED").is_file() and not (out / ".partial").exists()
    weights = out / TASKS[0] / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    code, err = run(train_lora_modules.main, capsys, *args)  # a finished set: refused, kept
    assert code == 2 and err.count("\n") == 1 and "holds a finished run" in err
    assert weights.stat().st_mtime_ns == before
    assert run(train_lora_modules.main, capsys, *args, "--overwrite", "true")[0] == 0
    assert weights.stat().st_mtime_ns != before


@pytest.mark.parametrize(("args", "message"), [
    (["--upstream.tasks", "no_such_task"], "--upstream.tasks: 'no_such_task' is not a LoRAHub "
                                           "module task"),
    (["--upstream.batch-size", "0"], "--upstream.batch-size must be >= 1, got 0"),
    (["--model.path", "/no/model.bin"], "--model.path /no/model.bin does not exist"),
    (["--out", "{file}"], "is a file"),
    (["--out", "/proc/no/such"], "--out /proc/no/such: cannot create or write in /proc"),
])
def test_train_lora_modules_bad_input_is_one_line(args, message, capsys, shared_data, tmp_path):
    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "modules")]
    code, err = run(train_lora_modules.main, capsys, "--data-dir", str(shared_data),
                    "--progress", "false", *args)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert err.startswith("python -m experiments.train_lora_modules: error:")


def test_empty_module_folder_says_it_trains_first(capsys, shared_data, tmp_path, monkeypatch):
    """An empty `--modules.dir` is not trained into silently: one line says what and where."""
    trained = []
    monkeypatch.setattr(lorahub_bbh, "train_modules", lambda config: trained.append(config))
    monkeypatch.setattr(lorahub_bbh, "module_pool", lambda config: ([], {}))
    config = lorahub_bbh.parse_cli(["--data-dir", str(shared_data), "--modules.dir",
                                    str(tmp_path / "mods"), "--upstream.num-modules", "3"])
    assert lorahub_bbh.ensure_modules(config) is None and len(trained) == 1
    line = capsys.readouterr().out.strip()
    assert line == (f"python -m experiments.lorahub_bbh: --modules.dir {tmp_path / 'mods'} holds "
                    f"no LoRA modules: training 3 there first (as python -m "
                    f"experiments.train_lora_modules --out {tmp_path / 'mods'} does)")


def test_two_tasks_end_to_end_decoder_only(capsys, shared_data, tmp_path, write_peft_modules):
    """The TinyStories model, three modules, two tasks, two runs: every output is written."""
    modules, out = tmp_path / "modules", tmp_path / "run"
    write_peft_modules(modules, (*TASKS, "quoref_What_Is_The_Answer"))
    code, err = run(lorahub_bbh.main, capsys, "--data-dir", str(shared_data), "--progress",
                    "false", "--modules.dir", str(modules),
                    "--out", str(out), "--bbh.tasks", "navigate,web_of_lies",
                    "--t0.tasks", T0_TARGET, "--protocol.runs", "2",
                    "--protocol.modules-per-run", "2",
                    "--protocol.max-test-examples", "2", "--protocol.max-new-tokens", "2",
                    "--protocol.max-length", "64", "--protocol.budget", "8",
                    "--protocol.population-size", "4", "--protocol.search", "cmaes")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["navigate", "web_of_lies", T0_TARGET]
    draws = json.loads((out / "draws.json").read_text())
    for task in results["tasks"]:
        assert task["num_test"] == 2 and set(task["baselines"]) == {"zero_shot", "icl"}
        for run_result, draw in zip(task["runs"], draws, strict=True):
            assert run_result["modules"] == draw
            assert set(run_result["scores"]) == {"uniform", "best_single", "cmaes", "cobyla"}
    # The draws are random.seed(s); random.sample over the modules in LoRAHub's list order.
    assert draws == [random.Random(s).sample(
        [TASKS[0], TASKS[1], "quoref_What_Is_The_Answer"], 2) for s in (1, 2)]
    table = (out / "results.md").read_text()
    assert "| navigate | 2 |" in table and "LoRAHub CMA-ES (best)" in table
    assert f"| {T0_TARGET} | 2 |" in table and "| **average** | 6 |" in table
    assert table.startswith("# LoRAHub (cpu): BIG-Bench Hard and T0 targets")
    chance = load_t0_target(T0_TARGET, shared_data).majority_score(limit=2)
    assert f"most frequent train label scores {T0_TARGET} {chance:.1f}." in table
    assert (out / "search_progress.png").stat().st_size > 0
    assert (out / "command.txt").read_text().startswith(
        "python -m experiments.lorahub_bbh --data-dir")
    assert (out / "FINISHED").is_file()
    assert sorted(p.name for p in (out / "tasks").iterdir()) == [  # no partial record left
        f"{T0_TARGET}.json", "navigate.json", "web_of_lies.json"]
    code, err = run(lorahub_bbh.main, capsys, "--data-dir", str(shared_data), "--progress",
                    "false", "--modules.dir", str(modules), "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "holds a finished run" in err
    assert json.loads((out / "results.json").read_text()) == results  # not overwritten
