"""The tuning protocol (`slim_finetune --tune.trials N`, experiments/slim_tune.py): seeded draws
at matched parameters, selection on validation, one-line errors, and a run that never reads the
test items (poisoning them changes nothing the tuning writes)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from experiments.presets.slim import CPU
from experiments.slim_finetune import main
from experiments.slim_tune import LEARNING_RATE, apply_setting, draw_settings, select
from slim_jax.data import load_t0_template
from slim_jax.data.t0_tasks import stratified_split
from slim_jax.errors import ConfigError

TUNE8 = dataclasses.replace(CPU, tune=dataclasses.replace(CPU.tune, trials=8, seed=3))


def test_draws_are_seeded_matched_in_size_and_start_from_the_preset():
    for method in ("slim", "slim_no_identity", "dense_mixture", "lora"):
        settings = draw_settings(method, TUNE8)
        assert len(settings) == 8 and settings == draw_settings(method, TUNE8)
        assert settings[0][LEARNING_RATE] == CPU.train.optimizer.learning_rate
        low, high = TUNE8.tune.lr_range
        assert all(low <= s[LEARNING_RATE] <= high for s in settings[1:])
        assert len({s[LEARNING_RATE] for s in settings}) == 8
        if method == "lora":
            assert all(set(s) == {LEARNING_RATE} for s in settings)
            continue
        budget, scale = CPU.slim.num_lora_experts * CPU.slim.rank, CPU.slim.alpha / CPU.slim.rank
        for s in settings:
            assert s["slim.num_lora_experts"] * s["slim.rank"] == budget
            assert s["slim.alpha"] / s["slim.rank"] == pytest.approx(scale)
            config = apply_setting(TUNE8, s)  # every draw is a valid config
            assert config.slim.top_k <= config.slim.num_experts
        assert ("slim.yield_quantile" in settings[1]) == (method != "slim_no_identity")
    other_seed = dataclasses.replace(TUNE8, tune=dataclasses.replace(TUNE8.tune, seed=4))
    assert draw_settings("slim", other_seed)[1:] != draw_settings("slim", TUNE8)[1:]


def test_apply_setting_refuses_an_unknown_field():
    with pytest.raises(ConfigError, match="unknown config field 'learning_rat'"):
        apply_setting(CPU, {"train.optimizer.learning_rat": 1e-3})


def test_selection_by_validation_score_ties_go_to_the_earlier_trial():
    trials = [{"trial": k, "setting": {"k": k}, "downstream": d, "forgetting": f}
              for k, d, f in ((0, 0.6, 0.2), (1, 0.6, 0.2), (2, 0.5, 0.0))]
    assert select("m", trials, 0.0)["trial"] == 0
    assert select("m", trials, 1.0)["trial"] == 2  # 0.5 - 0 beats 0.6 - 0.2
    assert [r["trial"] for r in select("m", trials[::-1], 0.0)["trials"]] == [0, 1, 2]


@pytest.mark.parametrize("argv, flag", [
    (["--tune.trials", "-1"], "--tune.trials"),
    (["--tune.trials", "2", "--tune.lr-range", "1e-3,1e-4"], "--tune.lr-range"),
    (["--tune.trials", "2", "--tune.top-ks", "0"], "--tune.top-ks"),
    (["--tune.trials", "2", "--tune.yield-quantiles", "1.5"], "--tune.yield-quantiles"),
    (["--tune.trials", "2", "--task.kind", "gsm8k"], "--tune.trials"),
    (["--eval.curve-every", "-1"], "--eval.curve-every"),
])
def test_bad_tuning_values_are_one_line_naming_the_flag(argv, flag, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err, err
    assert not (tmp_path / "run").exists()  # refused before any work


def _poisoned_data(shared_data: Path, folder: Path) -> Path:
    """A data folder like `shared_data` in which every AG News test item's prompt is replaced
    (labels kept, so the split is unchanged)."""
    folder.mkdir()
    for entry in shared_data.iterdir():
        if entry.name != "t0_templates":
            os.symlink(entry, folder / entry.name)
    templates = folder / "t0_templates"
    templates.mkdir()
    labels = [e.answer for e in load_t0_template(CPU.task.names[0], shared_data)]
    _, test_items = stratified_split(labels, CPU.task.test_fraction, CPU.task.split_seed)
    test_items = set(test_items)
    for src in (shared_data / "t0_templates").iterdir():
        if src.stem not in CPU.task.names:
            os.symlink(src, templates / src.name)
            continue
        lines = src.read_text().splitlines()
        for i in test_items:
            record = json.loads(lines[i])
            record["prompt"] = "poison " * 30 + "\n"
            lines[i] = json.dumps(record)
        (templates / src.name).write_text("\n".join(lines) + "\n")
    return folder


SHORT = ["--methods", "lora", "--seeds", "0", "--tune.trials", "2", "--train.steps", "2",
         "--task.max-train", "32", "--task.max-test", "8", "--data.batch-size", "8",
         "--data.seq-len", "64", "--eval.max-length", "64", "--eval.max-new-tokens", "4",
         "--eval.batch-size", "8", "--general.num-stories", "2", "--general.story-tokens", "16",
         "--targets", "layers/4/self_attn/q_proj$", "--num-devices", "1", "--workers", "1"]


def _tuning_outputs(out: Path) -> tuple[dict, list[dict]]:
    """tuned.json, and every trial's record without its timings and paths."""
    trials = []
    for path in sorted((out / "tuning" / "runs").glob("*/trial*/result.json")):
        record = json.loads(path.read_text())
        trials.append({k: v for k, v in record.items()
                       if k not in ("train_seconds", "eval_seconds", "checkpoint")})
    return json.loads((out / "tuned.json").read_text()), trials


@pytest.mark.slow
def test_tuning_never_reads_the_test_items(processes, process_env, shared_data, tmp_path):
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    data = _poisoned_data(shared_data, tmp_path / "data")
    # Two processes sharing one compilation cache: the second run compiles nothing.
    for out, folder in ((clean, shared_data), (poisoned, data)):
        argv = processes.command("experiments.slim_finetune", *SHORT, "--out", str(out),
                                 "--data-dir", str(folder), "--compilation-cache",
                                 str(tmp_path / "xla"))
        processes.Run(argv, tmp_path / f"{out.name}.log", process_env).finish()
    tuned, trials = _tuning_outputs(clean)
    assert len(trials) == 2 and tuned["lora"]["trial"] in (0, 1)
    assert _tuning_outputs(poisoned) == (tuned, trials)  # the test items were never read
    # ... while the final runs, scored on the test items, do see the poison, and use the
    # tuned setting.
    final = [json.loads((out / "runs/lora/seed0/result.json").read_text())
             for out in (clean, poisoned)]
    assert all(r["setting"] == tuned["lora"]["setting"] for r in final)
    clean_answers, poisoned_answers = (
        (out / "runs/lora/seed0/predictions.jsonl").read_text() for out in (clean, poisoned))
    assert clean_answers != poisoned_answers
    assert "validation acc" in (clean / "tuning.md").read_text()
    assert math.isfinite(tuned["lora"]["validation"])
