"""BIG-Bench Hard: the 27 tasks, LoRAHub's prompt, the ADAPT split and exact-match scoring."""

from __future__ import annotations

import random

import pytest

from slim_jax.data import (
    BBH_DESCRIPTIONS,
    BBH_TASKS,
    BBHExample,
    ByteTokenizer,
    CausalLayout,
    adapt_indices,
    exact_match,
    exact_match_score,
    load_bbh,
    load_bbh_task,
    normalize_answer,
    tokenize_examples,
)
from slim_jax.data.bbh import read_description
from slim_jax.errors import ConfigError, DataError

README_SIZES = {"causal_judgement": 187, "penguins_in_a_table": 146, "snarks": 178}


@pytest.fixture(scope="module")
def bbh(shared_data):
    return load_bbh(data_dir=shared_data)


def test_all_27_tasks_load_with_the_readme_counts(bbh):
    assert len(BBH_TASKS) == 27 and tuple(bbh) == BBH_TASKS
    assert {n: len(t.examples) for n, t in bbh.items()} == {
        n: README_SIZES.get(n, 250) for n in BBH_TASKS}
    assert sum(len(t.examples) for t in bbh.values()) == 6511


def test_descriptions_are_the_line_after_the_separator(bbh, shared_data):
    assert bbh["boolean_expressions"].description == (
        "Evaluate the result of a random Boolean expression.")
    # The copy used for hub data equals the local prompt files.
    for name in BBH_TASKS:
        path = shared_data / "bbh" / "cot-prompts" / f"{name}.txt"
        assert read_description(path) == BBH_DESCRIPTIONS[name] == bbh[name].description


def test_prompt_format(bbh):
    task = bbh["sports_understanding"]
    example = task.examples[0]
    assert task.prompt(example.input) == (
        "Determine whether an artificially constructed sentence relating to sports is plausible "
        f"or not.\n\nQ: {example.input}\nA:")
    [pair] = task.as_examples([example])
    assert pair.instruction == task.prompt(example.input)
    assert pair.response == pair.answer == example.target


def test_in_context_prompt_prepends_the_adapt_shots(bbh):
    task = bbh["snarks"]
    adapt, test = task.adapt_split()
    prompt = task.icl_prompt(adapt, test[0].input)
    blocks = prompt.split("\n\n")
    assert blocks[0] == task.description
    assert prompt.count("\nA: ") == 5 and prompt.endswith(f"Q: {test[0].input}\nA:")
    for shot in adapt:
        assert f"Q: {shot.input}\nA: {shot.target}\n\n" in prompt
    assert task.as_examples([test[0]], shots=adapt)[0].instruction == prompt


def test_adapt_examples_are_seeded_and_kept_out_of_test(bbh):
    for name in ("snarks", "word_sorting", "penguins_in_a_table"):
        task = bbh[name]
        adapt, test = task.adapt_split()
        n = len(task.examples)
        indices = adapt_indices(n)
        # The reference: random.seed(42); shuffle the (input, target) pairs; keep the first 5.
        random.seed(42)
        pairs = [(e.input, e.target) for e in task.examples]
        random.shuffle(pairs)
        assert [(e.input, e.target) for e in adapt] == pairs[:5]
        assert list(adapt) == [task.examples[i] for i in indices]
        assert len(test) == n - 5
        assert not set(map(id, adapt)) & set(map(id, test))
        assert set(map(id, adapt)) | set(map(id, test)) == set(map(id, task.examples))
    assert adapt_indices(250) == [44, 98, 184, 123, 121]  # issue 12: the reference's draw


def test_tokenised_adapt_examples_score_the_target(bbh):
    tok = ByteTokenizer()
    layout = CausalLayout(tok, lengths=(512, 1024))
    adapt, _ = bbh["boolean_expressions"].adapt_split()
    for tokenized, example in zip(tokenize_examples(bbh["boolean_expressions"].as_examples(adapt),
                                                    layout), adapt, strict=True):
        assert tok.decode(tokenized.response) == example.target


@pytest.mark.parametrize(("prediction", "target", "correct"), [
    ("(A)", "(A)", True),
    ("(a)", "(A)", True),
    (" (A) ", "(A)", True),
    ("(A) (B)", "(A)", False),
    ("(B)", "(A)", False),
    ("False.", "False", True),
    ("false", "False", True),
    ("FALSE", "False", True),
    ("Fal se", "False", False),
    ("\n  24.\n", "24", True),
    ("2.4", "24", True),          # every "." is removed, as the reference does
    ("24 ", "25", False),
    ("valid", "invalid", False),
])
def test_exact_match_normalisation(prediction, target, correct):
    assert exact_match(prediction, target) is correct


def test_exact_match_score():
    assert normalize_answer("  Yes. ") == "yes"
    assert exact_match_score(["(A)", "True.", "no"], ["(A)", "True", "Yes"]) == pytest.approx(
        200 / 3)
    with pytest.raises(ConfigError, match="2 predictions for 3 targets"):
        exact_match_score(["a", "b"], ["a", "b", "c"])


def test_unknown_task_lists_valid_names(shared_data):
    with pytest.raises(DataError, match=r"'snark' is not a BIG-Bench Hard task; did you mean "
                                        r"\['snarks'\]\?.*boolean_expressions.*word_sorting"):
        load_bbh_task("snark", shared_data)
    with pytest.raises(DataError, match="not a BIG-Bench Hard task"):
        load_bbh(["snarks", "chess"], shared_data)


def test_k_larger_than_the_task_is_an_error(bbh):
    with pytest.raises(ConfigError, match="'penguins_in_a_table': K=147 ADAPT examples requested "
                                          "but the task has 146 examples"):
        bbh["penguins_in_a_table"].adapt_split(k=147)
    adapt, test = bbh["penguins_in_a_table"].adapt_split(k=146)
    assert len(adapt) == 146 and not test


def test_bad_local_files_are_named(tmp_path):
    (tmp_path / "bbh" / "cot-prompts").mkdir(parents=True)
    (tmp_path / "bbh" / "snarks.json").write_text(
        '{"canary": "", "examples": [{"input": "x", "target": "(A)"}, {"input": "y"}]}')
    (tmp_path / "bbh" / "cot-prompts" / "snarks.txt").write_text("canary\n-----\nFind it.\n")
    with pytest.raises(DataError, match=r"snarks\.json examples index 1: record has no field "
                                        "'target'"):
        load_bbh_task("snarks", tmp_path)
    (tmp_path / "bbh" / "navigate.json").write_text(
        '{"examples": [{"input": "x", "target": "No"}]}')
    with pytest.raises(DataError, match=r"cot-prompts/navigate\.txt does not exist"):
        load_bbh_task("navigate", tmp_path)


def test_hub_source_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"'lukaemon/bbh' config 'snarks' split 'test'.*offline"):
        load_bbh_task("snarks", source="hub")


def test_hub_source_uses_the_shared_descriptions(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: [
        {"input": f"{name} {config} {split}", "target": "(A)"}])
    task = load_bbh_task("snarks", source="hub")
    assert task.examples == (BBHExample("lukaemon/bbh snarks test", "(A)"),)
    assert task.description == "Determine which of two sentences is sarcastic."
