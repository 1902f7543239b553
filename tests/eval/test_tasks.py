"""Downstream tasks: T0 templates split by item (no leakage), alignment checks, choice sets."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from slim_jax.data import Example
from slim_jax.errors import ConfigError, DataError
from slim_jax.eval import DownstreamTask, gsm8k_task, t0_classification_task

AG_NEWS = ("ag_news_classify", "ag_news_recommend", "ag_news_which_section_choices")


def articles(examples) -> list[str]:
    """The article of each ag_news prompt: its longest line that is not template boilerplate
    (a line that recurs across many prompts)."""
    lines = [[line.strip() for line in e.instruction.splitlines() if line.strip()]
             for e in examples]
    seen = Counter(line for prompt in lines for line in set(prompt))
    return [max((line for line in prompt if seen[line] < 10), key=len) for prompt in lines]


def test_t0_templates_share_one_item_split(shared_data):
    task = t0_classification_task(AG_NEWS, shared_data, test_fraction=0.25, seed=0)
    assert len(task.test) == 3 * 50 and len(task.train) == 3 * 150
    found = articles(task.train + task.test)
    train_articles, test_articles = set(found[:len(task.train)]), set(found[len(task.train):])
    assert len(test_articles) == 50  # the same 50 items under every template
    assert not train_articles & test_articles
    # Each example's choices are its own template's labels.
    assert set(task.choices) == {("Business", "Science and technology"),
                                 ("Business executive", "Scientist"),
                                 ("Business", "Science and Technology")}
    assert all(e.answer in c for e, c in zip(task.test, task.choices, strict=True))
    assert task.majority_accuracy() == pytest.approx(0.6, abs=0.02)


def test_validation_split_is_carved_from_training_items_only(shared_data):
    task = t0_classification_task(AG_NEWS, shared_data, test_fraction=0.25, seed=0)
    val = t0_classification_task(AG_NEWS, shared_data, test_fraction=0.25, seed=0,
                                 validation=True)
    assert val.name == task.name + "/validation"
    assert len(val.test) == 3 * 37 and len(val.train) == 3 * 113
    split = articles(task.train + task.test)
    train_articles, test_articles = set(split[:len(task.train)]), set(split[len(task.train):])
    found = articles(val.train + val.test)
    fit, held = set(found[:len(val.train)]), set(found[len(val.train):])
    assert len(held) == 37 and not fit & held
    assert fit | held == train_articles and not (fit | held) & test_articles
    assert val.majority_accuracy() == pytest.approx(0.6, abs=0.03)


def test_t0_passages_shortened_alike_in_train_and_test(shared_data):
    full = t0_classification_task(AG_NEWS[:2], shared_data, seed=0)
    short = t0_classification_task(AG_NEWS[:2], shared_data, seed=0, max_passage_words=5)
    assert [e.answer for e in short.test] == [e.answer for e in full.test]
    for before, after in zip(full.train + full.test, short.train + short.test, strict=True):
        b, a = before.instruction.split("\n"), after.instruction.split("\n")
        changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        assert len(changed) <= 1 and after.answer == before.answer
        for i in changed:  # the article, cut to its first words; the question is kept
            assert a[i] == " ".join(b[i].split()[:5]) and len(b[i].split()) > 5
        assert any(line.endswith("?") for line in a)
    with pytest.raises(ConfigError, match="max_passage_words"):
        t0_classification_task(AG_NEWS[:1], shared_data, max_passage_words=0)


def test_t0_caps_and_seed(shared_data):
    a = t0_classification_task(AG_NEWS[:1], shared_data, max_train=20, max_test=10, seed=1)
    b = t0_classification_task(AG_NEWS[:1], shared_data, max_train=20, max_test=10, seed=1)
    c = t0_classification_task(AG_NEWS[:1], shared_data, max_train=20, max_test=10, seed=2)
    assert (len(a.train), len(a.test)) == (20, 10)
    assert a == b and a.test != c.test


def _write(folder, name, rows):
    path = folder / "t0_templates"
    path.mkdir(exist_ok=True)
    (path / f"{name}.jsonl").write_text("\n".join(
        json.dumps({"prompt": p, "completion": c + "<|endoftext|>"}) for p, c in rows))


def test_t0_refuses_templates_of_different_sources(tmp_path):
    _write(tmp_path, "a", [(f"item {i}\n", "yes" if i % 2 else "no") for i in range(8)])
    _write(tmp_path, "b", [(f"item {i}\n", "yes" if i % 3 else "no") for i in range(8)])
    _write(tmp_path, "c", [(f"item {i}\n", "yes" if i % 2 else "no") for i in range(6)])
    _write(tmp_path, "one", [(f"item {i}\n", "yes") for i in range(8)])
    with pytest.raises(DataError, match="do not correspond"):
        t0_classification_task(["a", "b"], tmp_path)
    with pytest.raises(DataError, match="same items"):
        t0_classification_task(["a", "c"], tmp_path)
    with pytest.raises(DataError, match="single label"):
        t0_classification_task(["one"], tmp_path)
    with pytest.raises(ConfigError):
        t0_classification_task([], tmp_path)


def test_task_validates_its_test_set():
    ok = Example("Q", "yes", answer="yes")
    with pytest.raises(DataError, match="not one of its choices"):
        DownstreamTask("t", "label", (), (ok,), (("no", "maybe"),))
    with pytest.raises(DataError, match="choice sets"):
        DownstreamTask("t", "label", (), (ok,), ())
    with pytest.raises(ConfigError, match="kind"):
        DownstreamTask("t", "essay", (), (ok,), (("yes",),))
    with pytest.raises(ConfigError, match="by generation"):
        DownstreamTask("t", "number", (), (Example("Q", "2", answer="2"),), ((),)).response("2")


def test_gsm8k_task_scores_numbers(shared_data):
    task = gsm8k_task(shared_data, max_train=4, max_test=3)
    assert (len(task.train), len(task.test), task.kind) == (4, 3, "number")
    answer = task.test[0].answer
    assert task.is_correct(task.extract(f"so the total is {answer}.", 0), 0)
    assert not task.is_correct(task.extract("no idea", 0), 0)
