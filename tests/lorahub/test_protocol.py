"""The BBH protocol: module draws, and short end-to-end runs for both model families."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from slim_jax.data import ByteTokenizer, load_bbh
from slim_jax.errors import ConfigError
from slim_jax.lorahub.protocol import ProtocolConfig, module_draws, run_bbh_task
from slim_jax.lorahub.report import plot_search_progress, results_json, results_table
from slim_jax.lorahub.upstream import read_module_ids, upstream_task_names
from tests.lorahub.conftest import (
    LLAMA_TARGETS,
    T5_TARGETS,
    random_modules,
    target_layers,
    tiny_llama,
    tiny_t5,
)

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

RUN_1 = [34, 145, 195, 16, 65, 30, 126, 194, 115, 120, 166, 97, 53, 24, 124, 7, 99, 110, 155, 0]


def test_module_draws_match_the_reference(shared_data):
    ids = read_module_ids(data_dir=shared_data)
    assert len(ids) == 196
    draws = module_draws(ids)
    assert [ids.index(n) for n in draws[0]] == RUN_1
    assert len(draws) == 5 and all(len(d) == 20 and len(set(d)) == 20 for d in draws)
    assert draws[1] != draws[0]
    with pytest.raises(ConfigError, match="cannot draw 20 modules per run from 3"):
        module_draws(ids[:3])


def test_upstream_tasks_follow_the_module_list(shared_data):
    names = upstream_task_names(shared_data)
    assert names[:2] == ["qasc_qa_with_separated_facts_3",
                         "wiki_hop_original_choose_best_object_affirmative_1"]
    assert all((shared_data / "t0_templates" / f"{n}.jsonl").stat().length > 0 for n in names)


def test_protocol_config_errors():
    with pytest.raises(ConfigError, match="smaller than one generation of population_size=8"):
        ProtocolConfig(search="cmaes", budget=4, population_size=8)
    with pytest.raises(ConfigError, match="unknown search method"):
        ProtocolConfig(compare=("nelder",))
    with pytest.raises(ConfigError, match="unknown search method"):
        ProtocolConfig(search="nelder")
    with pytest.raises(ConfigError, match="unknown baseline"):
        ProtocolConfig(baselines=("oracle",))


SMALL = ProtocolConfig(runs=2, modules_per_run=3, budget=8, population_size=4,
                       search="cmaes", compare=("cobyla",), max_new_tokens=4, max_test_examples=3,
                       max_length=96, generation_batch_size=4)


def test_two_tasks_end_to_end_encoder_decoder(shared_data, tmp_path):
    """A tiny random T5 through the whole protocol (the decoder-only run end to end is the
    TinyStories one of tests/experiments/test_lorahub_bbh.py)."""
    model = tiny_t5()
    pool = {m.name: m for m in random_modules(target_layers(model, T5_TARGETS), 4, scale=0.3)}
    draws = module_draws(list(pool), SMALL.runs, SMALL.modules_per_run)
    tasks = load_bbh(["navigate", "web_of_lies"], shared_data)
    notes, saved = [], []
    results = [run_bbh_task(task, model, ByteTokenizer(), pool, draws, SMALL,
                            progress=notes.append, save=saved.append if i == 0 else None)
               for i, task in enumerate(tasks.values())]
    assert len(notes) == 2 * (2 + 2 * 4)
    # Units of task x run: the result after the baselines and after each run went to `save`;
    # resumed from the one after run 1, run 1 is kept (not redone) and the result is the same.
    assert [len(r.runs) for r in saved] == [0, 1, 2]
    notes.clear()
    resumed = run_bbh_task(tasks["navigate"], model, ByteTokenizer(), pool, draws, SMALL,
                           progress=notes.append, done=saved[1])
    assert len(notes) == 2 + 2 * 4 and resumed.runs[0] is saved[1].runs[0]
    timeless = lambda r: {**dataclasses.asdict(r), "runs": [
        {**dataclasses.asdict(run), "seconds": None} for run in r.runs]}
    assert timeless(resumed) == timeless(results[0])
    for result in results:
        assert (result.num_adapt, result.num_test) == (5, 3)
        assert set(result.baselines) == {"zero_shot", "icl"}
        for run, names in zip(result.runs, draws, strict=True):
            assert run.modules == names
            assert set(run.scores) == {"uniform", "best_single", "cmaes", "cobyla"}
            assert all(0.0 <= s <= 100.0 for s in run.scores.values())
            assert run.best_single in names
            # Every search saw w = 0 first and returns its best evaluation.
            for method in ("cmaes", "cobyla"):
                history = np.asarray(run.histories[method])
                assert len(history) == 8 and np.all(np.diff(history) <= 0)
                assert run.objectives[method] == pytest.approx(history[-1])
                assert run.objectives[method] <= run.objectives["uniform"] or (
                    history[0] <= run.objectives["uniform"])
    table = results_table(results)
    assert "| navigate | 3 |" in table and "**average**" in table
    assert json.loads(results_json(results))["tasks"][1]["task"] == "web_of_lies"
    assert plot_search_progress(results, tmp_path / "p.png").stat().st_size > 0


def test_k_larger_than_the_task_is_refused(shared_data):
    model = tiny_llama()
    pool = {m.name: m for m in random_modules(target_layers(model, LLAMA_TARGETS), 2)}
    task = load_bbh(["navigate"], shared_data)["navigate"]
    with pytest.raises(ConfigError, match="K=300 ADAPT examples requested but the task has 250"):
        run_bbh_task(task, model, ByteTokenizer(), pool, [["m0", "m1"]], ProtocolConfig(k=300))
