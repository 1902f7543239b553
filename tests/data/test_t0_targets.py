"""T0 templates as unseen LoRAHub targets: ADAPT split, prompts, validation without test items."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from slim_jax.data import BBHExample, adapt_indices, load_t0_target, load_t0_task
from slim_jax.errors import ConfigError, DataError

NAME = "amazon_polarity_Is_this_product_review_positive"


def test_adapt_examples_come_from_the_train_part_as_bbh_draws_them(shared_data):
    target = load_t0_target(NAME, shared_data)
    task = load_t0_task(NAME, shared_data)
    adapt, test = target.adapt_split(5, 42)
    assert [a.input for a in adapt] == [task.train[i].instruction
                                        for i in adapt_indices(len(task.train), 5, 42)]
    assert [t.input for t in test] == [e.instruction for e in task.test]
    assert [t.target for t in test] == [e.answer for e in task.test]
    assert not {a.input for a in adapt} & {t.input for t in test}


def test_validation_scores_the_rest_of_the_train_part(shared_data):
    target = load_t0_target(NAME, shared_data, validation=True)
    adapt, scored = target.adapt_split(5, 42)
    assert len(adapt) + len(scored) == len(target.train) == 150
    assert not {a.input for a in adapt} & {s.input for s in scored}
    assert set(scored) <= set(target.train)


def test_validation_never_reads_the_test_items(shared_data):
    """Poison every test item: validation prompts, targets and the chance line do not change."""
    clean = load_t0_target(NAME, shared_data, validation=True)
    poisoned = dataclasses.replace(clean, test=tuple(BBHExample("poison", "poison")
                                                     for _ in clean.test))
    assert poisoned.adapt_split(5, 42) == clean.adapt_split(5, 42)
    assert poisoned.majority_score() == clean.majority_score()
    assert load_t0_target(NAME, shared_data).adapt_split()[1] != clean.adapt_split()[1]


def test_prompts_are_the_templates_own(shared_data):
    target = load_t0_target(NAME, shared_data)
    adapt, test = target.adapt_split()
    question = test[0].input
    assert target.prompt(question) == question and question.endswith("\n")
    icl = target.icl_prompt(adapt[:2], question)
    assert icl == f"{adapt[0].input}{adapt[0].target}\n\n{adapt[1].input}{adapt[1].target}\n\n" \
                  f"{question}"
    [example] = target.as_examples(test[:1], shots=adapt[:2])
    assert (example.instruction, example.response, example.answer) == (
        icl, test[0].target, test[0].target)


def test_majority_score_is_the_chance_line(shared_data):
    target = load_t0_target(NAME, shared_data)
    top, _ = Counter(e.target for e in target.train).most_common(1)[0]
    test = target.adapt_split()[1]
    assert target.majority_score() == pytest.approx(
        100 * sum(t.target == top for t in test) / len(test))
    assert target.majority_score(limit=10) == pytest.approx(
        100 * sum(t.target == top for t in test[:10]) / 10)


def test_bad_targets_are_named(shared_data):
    with pytest.raises(DataError, match="more than max_classes=20"):
        load_t0_target("quoref_What_Is_The_Answer", shared_data)
    with pytest.raises(ConfigError, match=f"T0 target '{NAME}': K=200 ADAPT examples requested "
                                          "but the task has 150"):
        load_t0_target(NAME, shared_data).adapt_split(200)
