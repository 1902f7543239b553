"""`python -m experiments.lorahub_search_study`: a small study end to end on the TinyStories model
(a BBH task and a T0 target), its restart after a finished target, the table's equal-time
columns, and one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from experiments import lorahub_search_study as study

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: whole commands
MODULES = ("qasc_qa_with_separated_facts_3", "wiki_hop_original_choose_best_object_affirmative_1",
           "quoref_What_Is_The_Answer")
T0_TARGET = "amazon_polarity_Is_this_product_review_positive"  # unseen: not a LoRAHub module
SMALL = (("cmaes P4 s0.5", "cmaes", {"population_size": 4, "sigma": 0.5}),
         ("cobyla (reference)", "cobyla", {}),
         ("gradient lr0.05", "gradient", {"learning_rate": 0.05}))


@pytest.fixture(scope="module")
def modules(tmp_path_factory, write_peft_modules):
    """Three rank-4 modules on q/v of the TinyStories model, B random (so w matters)."""
    return write_peft_modules(tmp_path_factory.mktemp("modules"), MODULES)


def test_a_small_study_end_to_end_and_its_restart(modules, shared_data, tmp_path, monkeypatch,
                                                  capsys):
    monkeypatch.setattr(study, "CONFIGS", SMALL)
    monkeypatch.setattr(study, "BUDGET", 8)
    out = tmp_path / "study"
    args = ["--modules", str(modules), "--data-dir", str(shared_data), "--tasks", "navigate",
            "--t0-tasks", T0_TARGET, "--runs", "2", "--per-run", "2", "--out", str(out),
            "--compilation-cache", "none"]
    assert study.main(args) == 0
    assert not (tmp_path / "none").exists() and not Path("none").exists()  # "none": no cache
    record = json.loads((out / "study.json").read_text())
    # The draws are the default command's: random.seed(s); random.sample in LoRAHub's order.
    assert record["draws"] == [random.Random(s).sample(list(MODULES), 2) for s in (1, 2)]
    assert [(t["task"], t["run"]) for t in record["targets"]] == [
        ("navigate", 1), (T0_TARGET, 1), ("navigate", 2), (T0_TARGET, 2)]
    for target in record["targets"]:
        assert set(target["results"]) == {c[0] for c in SMALL}
        for result in target["results"].values():
            values, times = result["values"], result["times"]
            assert len(values) == len(times) == 8 and np.all(np.diff(times) >= 0)
            assert np.all(np.isfinite(values))
    table = (out / "study.md").read_text()
    assert table.count("\n") == 2 + len(SMALL)
    assert "| cobyla (reference) |" in table and "@COBYLA's s for 40" in table
    row = next(line for line in table.splitlines() if line.startswith("| cobyla"))
    assert row.count("(") == 1 + 5  # the label's, and a range at 40, 100, 200 and both times
    assert (out / "study_evals.png").stat().st_size > 0
    assert (out / "study_seconds.png").stat().st_size > 0

    def no_search(*a, **k):
        raise AssertionError("a finished target was searched again")

    monkeypatch.setattr(study, "search", no_search)  # a restart keeps every finished target
    capsys.readouterr()
    assert study.main(args) == 0
    assert json.loads((out / "study.json").read_text()) == record


@pytest.mark.parametrize(("extra", "message"), [
    (["--t0-tasks", MODULES[0]], f"--t0-tasks: {MODULES[0]!r} is one of the modules in"),
    (["--tasks", "", "--t0-tasks", ""], "no target: give --tasks or --t0-tasks"),
    (["--tasks", "no_such_task"], "no_such_task"),
])
def test_bad_input_is_one_line(extra, message, modules, shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["--modules", str(modules), "--data-dir", str(shared_data), "--out",
                    str(tmp_path / "s"), "--compilation-cache", "none", "--per-run", "2", *extra])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err
    assert err.strip().splitlines()[-1].startswith("python -m experiments.lorahub_search_study:")


def test_equal_wall_time_reads_what_finished_by_then():
    values, times = [4.0, 3.0, 5.0, 1.0], [0.1, 0.2, 0.3, 0.4]
    assert study._at_seconds(values, times, 4.0, 0.25) == 0.75  # best of the first two
    assert study._at_seconds(values, times, 4.0, 0.05) == 1.0  # nothing yet: no progress
    assert study._at_seconds(values, times, 4.0, 9.0) == 0.25
