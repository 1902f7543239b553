"""Top-k and dense routing, identity slots and the gated expert mixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slim_jax.core.routing import (
    dense_weights,
    lora_mixture_delta,
    split_gates,
    top_k_weights,
)
from slim_jax.errors import ConfigError, ShapeError


@st.composite
def logits_and_k(draw):
    num_experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    logits = np.random.default_rng(seed).normal(size=(tokens, num_experts)) * 3
    return logits.astype(np.float32), k


@settings(max_examples=20, deadline=None)
@given(logits_and_k())
def test_top_k_selects_k_largest_and_renormalises(case):
    logits, k = case
    weights = np.asarray(top_k_weights(jnp.asarray(logits), k))
    assert np.all(np.count_nonzero(weights, axis=-1) == k)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    for row, w in zip(logits, weights, strict=True):
        chosen = np.argsort(-row, kind="stable")[:k]
        ref = np.zeros_like(row)
        ref[chosen] = np.exp(row[chosen] - row[chosen].max())
        np.testing.assert_allclose(w, ref / ref.sum(), rtol=1e-5, atol=1e-7)


def test_ties_go_to_lower_index_with_exactly_k():
    weights = top_k_weights(jnp.zeros((2, 5)), 3)
    np.testing.assert_allclose(weights, [[1 / 3] * 3 + [0, 0]] * 2, rtol=1e-6)


def test_k_out_of_range_is_named():
    with pytest.raises(ConfigError, match=r"top_k .* number of experts \(4\), got 5"):
        top_k_weights(jnp.zeros(4), 5)
    with pytest.raises(ConfigError, match="got 0"):
        top_k_weights(jnp.zeros(4), 0)


def test_gradient_reaches_only_selected_logits():
    logits = jnp.array([0.1, 2.0, -1.0, 1.0])
    grad = jax.grad(lambda z: top_k_weights(z, 2)[1])(logits)
    assert grad[1] != 0 and grad[3] != 0
    assert grad[0] == 0 and grad[2] == 0


def test_dense_is_softmax():
    logits = jnp.array([[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(dense_weights(logits), jax.nn.softmax(logits), rtol=1e-6)


def test_identity_slots_are_last_columns():
    lora, ident = split_gates(jnp.arange(5.0), 2)
    assert lora.tolist() == [0.0, 1.0, 2.0] and ident.tolist() == [3.0, 4.0]


def test_mixture_equals_loop_over_experts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6)).astype(np.float32)
    a = rng.normal(size=(4, 6, 2)).astype(np.float32)
    b = rng.normal(size=(4, 2, 5)).astype(np.float32)
    gates = rng.uniform(size=(2, 3, 4)).astype(np.float32)
    ref = sum(gates[..., e : e + 1] * 1.5 * (x @ a[e]) @ b[e] for e in range(4))
    got = jax.jit(lora_mixture_delta)(x, a, b, gates, 1.5)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_mixture_rejects_gates_of_wrong_width():
    with pytest.raises(ShapeError, match=r"gates \(1, 3\)"):
        lora_mixture_delta(jnp.ones((1, 6)), jnp.ones((4, 6, 2)), jnp.ones((4, 2, 5)),
                           jnp.ones((1, 3)), 1.0)
