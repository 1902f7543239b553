"""General capability on the base model's stories, and forgetting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.eval import (
    StoryCapability,
    forgetting_by_measure,
    mean_std,
    sample_stories,
    story_metrics,
    story_reference,
)
from slim_jax.nn import LoRAConfig, inject

from .conftest import tiny_llama


def test_stories_depend_on_the_seed_only(llama, tokenizer):
    a = sample_stories(llama, tokenizer, num_stories=3, max_new_tokens=10, seed=7, batch_size=2)
    b = sample_stories(llama, tokenizer, num_stories=3, max_new_tokens=10, seed=7, batch_size=2)
    c = sample_stories(llama, tokenizer, num_stories=3, max_new_tokens=10, seed=8, batch_size=2)
    assert a == b and a != c
    assert all(s[0] == tokenizer.bos_id and 9 <= len(s) <= 11 for s in a)


def test_story_metrics_against_a_direct_computation(llama, tokenizer):
    stories = [[1, 70, 71, 72, 73], [1, 80, 81]]
    reference = story_reference(llama, tokenizer, stories, max_length=6)
    base = story_metrics(llama, reference)
    assert base["top1_agreement"] == 1.0 and base["kl_to_base"] == 0.0
    other = tiny_llama(seed=5)
    after = story_metrics(other, reference)
    nll, kl, agree, count = 0.0, 0.0, 0.0, 0
    for story in stories:
        ids = jnp.asarray([story[:-1]])
        p = np.asarray(jax.nn.log_softmax(llama(ids), -1)[0], np.float64)
        q = np.asarray(jax.nn.log_softmax(other(ids), -1)[0], np.float64)
        for t, target in enumerate(story[1:]):
            nll -= q[t, target]
            kl += np.sum(np.exp(p[t]) * (p[t] - q[t]))
            agree += float(np.argmax(p[t]) == np.argmax(q[t]))
            count += 1
    assert after["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert after["kl_to_base"] == pytest.approx(kl / count, rel=1e-4)
    assert after["top1_agreement"] == pytest.approx(agree / count)
    assert after["perplexity"] == pytest.approx(np.exp(after["nll"]))


def test_a_zero_adapter_changes_nothing_and_a_trained_one_forgets(llama, tokenizer):
    capability = StoryCapability.sample(llama, tokenizer, num_stories=4, max_new_tokens=12,
                                        seed=0, batch_size=4)
    before = capability.measure(llama)
    inject(llama, "proj", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(3))  # B = 0: no change
    assert capability.measure(llama) == before
    for path, var in nnx.iter_graph(llama):
        if path and path[-1] == "lora_b":
            var.set_value(jax.random.normal(jax.random.key(len(path)), var.shape))
    drops = forgetting_by_measure(capability, before, capability.measure(llama))
    assert drops["nll"] > 0 and drops["kl_to_base"] > 0 and drops["top1_agreement"] > 0


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
