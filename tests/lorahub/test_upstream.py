"""Upstream modules scored on their own task: the held-out split and the module's accuracy."""

from __future__ import annotations

import pytest

from slim_jax.data import ByteTokenizer, Example, load_t0_template
from slim_jax.errors import DataError
from slim_jax.lorahub import upstream
from slim_jax.lorahub.predict import greedy_answers
from slim_jax.lorahub.upstream import (
    UpstreamConfig,
    heldout_split,
    module_accuracy,
)
from tests.lorahub.conftest import LLAMA_TARGETS, random_modules, target_layers, tiny_llama


def test_heldout_split_is_disjoint_deterministic_and_ordered():
    examples = [Example(str(i), "x") for i in range(50)]
    train, held = heldout_split(examples, 10)
    assert len(train) == 40 and len(held) == 10
    assert {e.instruction for e in train} | {e.instruction for e in held} == {
        str(i) for i in range(50)}
    assert not {e.instruction for e in train} & {e.instruction for e in held}
    assert heldout_split(examples, 10) == (train, held)
    assert [int(e.instruction) for e in held] == sorted(int(e.instruction) for e in held)
    assert heldout_split(examples, 0) == (examples, [])
    assert heldout_split(examples[:49], 10) == (examples[:49], [])  # too small to hold out


def test_train_task_module_never_trains_on_the_heldout_examples(shared_data, monkeypatch):
    seen = []
    monkeypatch.setattr(upstream, "train_module",
                        lambda model, layout, examples, *a, **k: seen.append(examples))
    task = "qasc_is_correct_1"
    config = UpstreamConfig(heldout=20)
    upstream.train_task_module(None, None, task, config, data_dir=shared_data)
    _, held = heldout_split(load_t0_template(task, shared_data), 20)
    assert len(seen[0]) == 180 and not set(seen[0]) & set(held)


def test_module_accuracy_scores_the_merged_module_and_leaves_the_model_alone():
    """Answers the base model gives are matched exactly with a zero module (B = 0) and mostly
    missed with a large random one; the model keeps computing the base function."""
    model, tokenizer = tiny_llama(), ByteTokenizer()
    prompts = [f"{i} plus {i % 3} is?" for i in range(12)]
    said = greedy_answers(model, tokenizer, prompts, max_new_tokens=4)
    examples = [Example(p, s) for p, s in zip(prompts, said, strict=True)]
    [zero] = random_modules(target_layers(model, LLAMA_TARGETS), 1, scale=0.0)
    [large] = random_modules(target_layers(model, LLAMA_TARGETS), 1, scale=3.0)
    assert module_accuracy(model, tokenizer, zero, examples, max_new_tokens=4) == 100.0
    assert module_accuracy(model, tokenizer, large, examples, max_new_tokens=4) < 50.0
    assert greedy_answers(model, tokenizer, prompts, max_new_tokens=4) == said
    with pytest.raises(DataError, match="no examples to score module 'm0' on"):
        module_accuracy(model, tokenizer, zero, [])
