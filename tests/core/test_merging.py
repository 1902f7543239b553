"""Merge/unmerge and the linear / task arithmetic / TIES / DARE combinations vs NumPy (and PEFT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core import merging
from slim_jax.errors import ConfigError, ShapeError

# Three hand-made task tensors [N=3, 2, 3].
T = np.array(
    [
        [[0.5, -1.0, 0.0], [2.0, 0.1, -0.3]],
        [[-0.4, -2.0, 1.0], [1.0, -0.2, 0.3]],
        [[0.6, 0.5, -3.0], [-0.1, 0.4, 0.2]],
    ],
    np.float32,
)
# Weighted and unweighted sign elections differ at [0, 1] (-2.5 vs +0.5): TIES elects unweighted.
W = np.array([1.0, 0.5, 5.0], np.float32)


def np_trim(t, density):
    out = np.zeros_like(t)
    k = int(density * t[0].size)
    for i, ti in enumerate(t):
        flat = ti.reshape(-1)
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        o = np.zeros_like(flat)
        o[keep] = flat[keep]
        out[i] = o.reshape(ti.shape)
    return out


def np_disjoint(t, w):
    elected = np.where(t.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(t) == elected
    weighted = t * w[:, None, None]
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_merge_then_unmerge_returns_the_kernel():
    rng = np.random.default_rng(0)
    kernel, a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    kernel, a, b = (jnp.asarray(v, jnp.float32) for v in (kernel, a, b))
    merged = jax.jit(merging.merge_lora)(kernel, a, b, 0.5)
    np.testing.assert_allclose(merged, kernel + 0.5 * a @ b, rtol=1e-6)
    np.testing.assert_allclose(merging.unmerge_lora(merged, a, b, 0.5), kernel, atol=1e-6)
    with pytest.raises(ShapeError, match="kernel"):
        merging.merge_lora(kernel, b, a, 1.0)


def test_task_arithmetic_is_weighted_sum():
    got = merging.task_arithmetic(jnp.asarray(T), jnp.asarray(W))
    np.testing.assert_allclose(got, (T * W[:, None, None]).sum(0), rtol=1e-6)


def test_linear_is_peft_factorwise_with_signed_square_roots():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 2, 5))
    w, scales = np.array([0.5, -1.0, 2.0]), np.array([2.0, 1.0, 0.5])
    got_a, got_b = merging.linear(jnp.asarray(a), jnp.asarray(b), jnp.asarray(w),
                                  jnp.asarray(scales))
    c = w * scales
    ref_a = sum(np.sign(ci) * np.sqrt(abs(ci)) * ai for ci, ai in zip(c, a, strict=True))
    ref_b = sum(np.sqrt(abs(ci)) * bi for ci, bi in zip(c, b, strict=True))
    np.testing.assert_allclose(got_a, ref_a, rtol=1e-5)
    np.testing.assert_allclose(got_b, ref_b, rtol=1e-5)
    one_a, one_b = merging.linear(jnp.asarray(a[:1]), jnp.asarray(b[:1]), jnp.array([-3.0]), 2.0)
    np.testing.assert_allclose(one_a @ one_b, -6.0 * a[0] @ b[0], rtol=1e-5)  # one adapter: exact


def test_linear_needs_equal_ranks():
    with pytest.raises(ShapeError, match="equal rank"):
        merging.linear(jnp.ones((2, 4, 2)), jnp.ones((2, 3, 5)), jnp.ones(2))


def test_magnitude_trim_keeps_exactly_the_largest():
    got = merging.magnitude_trim(jnp.asarray(T), 0.5)
    np.testing.assert_array_equal(got, np_trim(T, 0.5))
    assert np.all(np.count_nonzero(np.asarray(got).reshape(3, -1), axis=1) == 3)


def test_ties_matches_numpy():
    got = jax.jit(merging.ties, static_argnums=2)(jnp.asarray(T), jnp.asarray(W), 0.5)
    np.testing.assert_allclose(got, np_disjoint(np_trim(T, 0.5), W), rtol=1e-6)
    # Hand-checked: at [0, 2] the trimmed values 0, 1, -3 elect -, only task 2 agrees (5 * -3);
    # at [0, 1] the trimmed -1, -2, 0.5 elect -: the mean of 1 * -1 and 0.5 * -2.
    assert float(got[0, 2]) == pytest.approx(-15.0)
    assert float(got[0, 1]) == pytest.approx(-1.0)


def test_ties_matches_peft():
    torch = pytest.importorskip("torch")
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    ref = merge_utils.ties([torch.tensor(t) for t in T], torch.tensor(W), 0.5, "total")
    got = merging.ties(jnp.asarray(T), jnp.asarray(W), 0.5)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)


def test_sign_election_by_frequency():
    mask = merging.elect_sign(jnp.asarray(T), "frequency")
    elected = np.where(np.sign(T).sum(0) >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(mask, np.sign(T) == elected)


def test_dare_matches_numpy_with_the_same_mask():
    key, p = jax.random.key(4), 0.5
    keep = np.asarray(jax.random.bernoulli(key, 1 - p, T.shape))
    dropped = np.where(keep, T, 0) / (1 - p)
    np.testing.assert_allclose(merging.dare_linear(key, jnp.asarray(T), jnp.asarray(W), p),
                               (dropped * W[:, None, None]).sum(0), rtol=1e-6)
    np.testing.assert_allclose(merging.dare_ties(key, jnp.asarray(T), jnp.asarray(W), p),
                               np_disjoint(dropped, W), rtol=1e-6)


def test_dare_is_unbiased_over_keys():
    keys = jax.random.split(jax.random.key(5), 4000)
    samples = np.asarray(jax.vmap(
        lambda k: merging.dare_linear(k, jnp.asarray(T), jnp.asarray(W), 0.3))(keys))
    z = np.abs(samples.mean(0) - (T * W[:, None, None]).sum(0)) / (
        samples.std(0) / np.sqrt(len(keys)))
    assert z.max() < 5.0


def test_deltas_and_svd_roundtrip():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 6, 2)), rng.normal(size=(2, 2, 5))
    deltas = merging.lora_deltas(jnp.asarray(a), jnp.asarray(b), jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(deltas[1], 0.5 * a[1] @ b[1], rtol=1e-5)
    fa, fb = merging.delta_to_lora(deltas[0], 2)
    assert fa.shape == (6, 2) and fb.shape == (2, 5)
    np.testing.assert_allclose(fa @ fb, deltas[0], atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="density"):
        merging.ties(jnp.asarray(T), jnp.asarray(W), 0.0)
    with pytest.raises(ConfigError, match=r"p must be in \[0, 1\)"):
        merging.dare_linear(jax.random.key(0), jnp.asarray(T), jnp.asarray(W), 1.0)
    with pytest.raises(ShapeError, match="weights"):
        merging.task_arithmetic(jnp.asarray(T), jnp.ones(2))
