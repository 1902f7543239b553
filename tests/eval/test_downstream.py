"""Downstream accuracy: likelihood scores are the model's own, generation is chunked faithfully,
and SLIM's dynamic merging works inside generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.data import CausalLayout, Example
from slim_jax.errors import ConfigError
from slim_jax.eval import (
    DownstreamTask,
    accuracy_by_generation,
    accuracy_by_likelihood,
    apply_model,
    downstream_accuracy,
    generate_texts,
    sequence_log_likelihoods,
)
from slim_jax.eval import downstream as downstream_module
from slim_jax.models.generate import generate
from slim_jax.nn import SlimConfig, inference_view, inject


@nnx.jit
def _log_probs(model, ids):
    return jax.nn.log_softmax(model(ids), axis=-1)


def direct_log_likelihood(model, tokenizer, prompt: str, response: str) -> float:
    """log p(response + EOS | BOS prompt) from one plain forward pass (right-padded to 32
    tokens, which a causal model ignores, so one program serves every call)."""
    p = tokenizer.encode(prompt, add_bos=True)
    r = tokenizer.encode(response, add_eos=True)
    ids = (p + r)[:-1]
    log_probs = np.asarray(_log_probs(model, jnp.asarray([ids + [0] * (32 - len(ids))])))[0]
    return float(sum(log_probs[len(p) - 1 + i, t] for i, t in enumerate(r)))


def test_sequence_log_likelihoods_equal_a_direct_forward(llama, tokenizer):
    layout = CausalLayout(tokenizer, lengths=(16, 32))
    pairs = [("Q: one", "yes"), ("Q: a longer question", "no"), ("Q", "maybe so")]
    examples = [layout.fit(layout.encode(p, r)) for p, r in pairs]
    sums, counts = sequence_log_likelihoods(llama, examples, layout, batch_size=2)
    expected = [direct_log_likelihood(llama, tokenizer, p, r) for p, r in pairs]
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(r) + 1 for _, r in pairs]


def test_likelihood_accuracy_predicts_the_best_scoring_choice(llama, tokenizer):
    prompts = ["Is it red?", "Is it blue?", "Is it green?", "Is it big?"]
    choices = ("yes", "no")
    scores = [[direct_log_likelihood(llama, tokenizer, p, c) for c in choices] for p in prompts]
    best = [choices[int(np.argmax(s))] for s in scores]
    answers = [best[0], best[1], "no" if best[2] == "yes" else "yes", best[3]]
    task = DownstreamTask("toy", "label", (), tuple(Example(p, a, answer=a)
                                                   for p, a in zip(prompts, answers, strict=True)),
                          (choices,) * len(prompts))
    result = accuracy_by_likelihood(llama, tokenizer, task, max_length=32, batch_size=3)
    assert result.predictions == tuple(best)
    assert result.correct == (True, True, False, True) and result.accuracy == 0.75
    normalized = accuracy_by_likelihood(llama, tokenizer, task, max_length=32,
                                        length_normalized=True)
    expected = [choices[int(np.argmax([s / (len(c) + 1) for s, c in zip(row, choices,
                                                                       strict=True)]))]
                for row in scores]
    assert normalized.predictions == tuple(expected)


def test_generation_is_the_same_whatever_the_chunking(llama, tokenizer):
    prompts = ["Once", "There was a cat", "Q: 2+2=", "hello", "x"]
    one_call = generate_texts(llama, tokenizer, prompts, max_new_tokens=5, max_prompt_tokens=16,
                              batch_size=8)
    chunked = generate_texts(llama, tokenizer, prompts, max_new_tokens=5, max_prompt_tokens=16,
                             batch_size=2)
    assert one_call == chunked and len(one_call) == len(prompts)
    alone = generate(llama, ["There was a cat"], tokenizer=tokenizer, max_new_tokens=5)
    assert one_call[1] == alone.texts[0]


def test_generation_accuracy_extracts_answers(llama, tokenizer, monkeypatch):
    replies = {"A?": " Positive!", "B?": " negative", "C?": " I do not know"}

    def fake_generate(model, rows, *, tokenizer, max_new_tokens, min_bucket):
        texts = [replies[tokenizer.decode(row)] for row in rows]
        return type("G", (), {"texts": texts})()

    monkeypatch.setattr(downstream_module, "generate", fake_generate)
    labels = ("Negative", "Positive")
    task = DownstreamTask("toy", "label", (), (Example("A?", "Positive", answer="Positive"),
                                               Example("B?", "Positive", answer="Positive"),
                                               Example("C?", "Negative", answer="Negative")),
                          (labels,) * 3)
    result = accuracy_by_generation(llama, tokenizer, task, max_prompt_tokens=8, batch_size=2)
    assert result.predictions == ("Positive", "Negative", None)
    assert result.correct == (True, False, False) and result.accuracy == pytest.approx(1 / 3)


def test_modes_are_checked(llama, tokenizer):
    task = DownstreamTask("toy", "number", (), (Example("1+1=", "2", answer="2"),), ((),))
    with pytest.raises(ConfigError, match="mode"):
        downstream_accuracy(llama, tokenizer, task, mode="vote")
    with pytest.raises(ConfigError, match="by generation"):
        downstream_accuracy(llama, tokenizer, task, mode="likelihood")
    with pytest.raises(ConfigError, match="max_length"):
        downstream_accuracy(llama, tokenizer, task, max_length=8, max_new_tokens=8)


def test_slim_dynamic_merging_in_evaluation(llama, tokenizer):
    config = SlimConfig(num_lora_experts=2, num_identity_experts=1, top_k=2, rank=2, alpha=4,
                        num_clusters=2, yielding=False, dropmerge_p=0.5)
    inject(llama, "layers/0/mlp/down_proj", config, rngs=nnx.Rngs(1))
    for path, var in nnx.iter_graph(llama):  # non-zero experts, so masks change the output
        if path and path[-1] == "experts_b":
            var.set_value(0.5 * jax.random.normal(jax.random.key(len(path)), var.shape))
    model = inference_view(llama)
    layer = model.layers[0].mlp.down_proj
    # Scoring: every call draws fresh masks from the model's own streams.
    batch = {"tokens": jnp.arange(3, 9)[None], "segment_ids": jnp.ones((1, 6), jnp.int32)}
    first = apply_model(model, lambda m, b: m.batch_logits(b), batch)
    second = apply_model(model, lambda m, b: m.batch_logits(b), batch)
    assert np.abs(first - second).max() > 1e-3
    # Generation: fresh masks on every forward pass (prefill and each token) inside the jitted
    # decoding loop, the streams written back, so reseeding repeats the texts.
    def run() -> tuple[list[str], int]:
        nnx.reseed(model, slim=5)
        texts = generate_texts(model, tokenizer, ["Once", "Twice"], max_new_tokens=4,
                               max_prompt_tokens=8, batch_size=1)
        return texts, int(layer.rngs.count[...])

    texts, drawn = run()
    assert len(texts) == 2 and drawn > 2  # more than one draw per generation call
    assert run() == (texts, drawn)
