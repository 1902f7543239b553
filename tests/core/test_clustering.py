"""Sliding clustering, distance and weight yielding against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core.clustering import (
    ClusterStats,
    cluster_sigma,
    distance,
    empty_clusters,
    init_from_tokens,
    max_z,
    nearest_cluster,
    token_quantile,
    update_clusters,
    yield_logits,
)
from slim_jax.core.routing import split_gates, top_k_weights
from slim_jax.errors import ConfigError, ShapeError


def numpy_update(mean, var, x, w, m):
    """SLIM.md s2 EMA, written token by token."""
    mean, var = mean.copy(), var.copy()
    assign = [int(np.argmin(((mean - t) ** 2).sum(-1))) for t in x]
    for c in range(mean.shape[0]):
        idx = [i for i, a in enumerate(assign) if a == c and w[i] > 0]
        if not idx:
            continue
        ww = w[idx][:, None]
        batch_mean = (ww * x[idx]).sum(0) / ww.sum()
        mean[c] = m * mean[c] + (1 - m) * batch_mean
        var[c] = m * var[c] + (1 - m) * (ww * (x[idx] - mean[c]) ** 2).sum(0) / ww.sum()
    return mean, var


def test_ema_update_matches_numpy_with_padding_and_an_idle_centre():
    rng = np.random.default_rng(0)
    mean = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [100.0, 100.0, 100.0]], np.float32)
    var = rng.uniform(0.5, 2.0, size=(3, 3)).astype(np.float32)
    x = np.concatenate([rng.normal(0, 1, (5, 3)), rng.normal(5, 1, (4, 3))]).astype(np.float32)
    x[7] = 100.0  # a padding token next to the idle centre: must not move it
    w = np.ones(9, np.float32)
    w[7] = 0.0
    stats = ClusterStats(jnp.asarray(mean), jnp.asarray(var), jnp.array(3, jnp.int32))
    got = jax.jit(update_clusters)(stats, jnp.asarray(x).reshape(3, 3, 3),
                                   jnp.asarray(w).reshape(3, 3), 0.9)
    ref_mean, ref_var = numpy_update(mean, var, x, w, 0.9)
    np.testing.assert_allclose(got.mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, ref_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.mean[2], mean[2])  # no real token: unchanged
    np.testing.assert_array_equal(got.var[2], var[2])
    assert int(got.count) == 4


def test_no_gradient_flows_through_the_update():
    stats = ClusterStats(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array(1, jnp.int32))
    x = jax.random.normal(jax.random.key(0), (6, 3))

    def loss(mean, var, x):
        new = update_clusters(ClusterStats(mean, var, stats.count), x, None, 0.5)
        return jnp.sum(new.mean**2) + jnp.sum(new.var**2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(stats.mean, stats.var, x)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_init_draws_distinct_real_tokens_and_batch_variance():
    x = jnp.arange(40.0).reshape(2, 5, 4)
    w = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
    stats = jax.jit(init_from_tokens, static_argnums=2)(x, jax.random.key(3), 4, w)
    flat, wf = np.asarray(x).reshape(-1, 4), np.asarray(w).reshape(-1)
    real = {tuple(t) for t, keep in zip(flat, wf, strict=True) if keep}
    centres = [tuple(c) for c in np.asarray(stats.mean)]
    assert len(set(centres)) == 4 and set(centres) <= real
    ref_var = flat[wf > 0].var(0)
    np.testing.assert_allclose(stats.var, np.broadcast_to(ref_var, (4, 4)), rtol=1e-5)
    assert int(stats.count) == 1


def test_init_with_fewer_tokens_than_clusters_reuses_tokens():
    stats = init_from_tokens(jnp.arange(4.0).reshape(2, 2), jax.random.key(0), 5)
    assert {tuple(c) for c in np.asarray(stats.mean)} <= {(0.0, 1.0), (2.0, 3.0)}


def test_nearest_and_distance_match_numpy():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(4, 6)).astype(np.float32) * 3
    var = rng.uniform(0.2, 3, size=(4, 6)).astype(np.float32)
    x = rng.normal(size=(2, 7, 6)).astype(np.float32) * 3
    stats = ClusterStats(jnp.asarray(mean), jnp.asarray(var), jnp.array(1))
    near = np.argmin(((x[..., None, :] - mean) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(nearest_cluster(stats, jnp.asarray(x)), near)
    ref = np.max(np.abs(x - mean[near]) / np.sqrt(var[near] + 1e-6), axis=-1) - 1
    np.testing.assert_allclose(jax.jit(distance)(stats, jnp.asarray(x)), ref, rtol=1e-5)
    # The threshold t replaces the spec's 1: d = max_j z_j - t.
    shifted = jax.jit(distance)(stats, jnp.asarray(x), 1e-6, 3.5)
    np.testing.assert_allclose(shifted, ref + 1 - 3.5, rtol=1e-5, atol=1e-5)


def test_token_quantile_matches_numpy_and_skips_padding():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(3, 11)).astype(np.float32)
    weights = (rng.uniform(size=(3, 11)) > 0.3).astype(np.float32)
    counted = np.sort(values[weights > 0])
    for q in (0.1, 0.5, 0.9):
        want = counted[int(np.floor(q * (counted.size - 1)))]
        got = jax.jit(token_quantile, static_argnums=1)(jnp.asarray(values), q,
                                                         jnp.asarray(weights))
        assert float(got) == want
    assert float(token_quantile(jnp.asarray(values), 0.5)) == np.sort(values.ravel())[16]
    with pytest.raises(ConfigError, match=r"quantile q must be in \(0, 1\)"):
        token_quantile(jnp.asarray(values), 1.0)
    with pytest.raises(ShapeError, match="token_weights"):
        token_quantile(jnp.asarray(values), 0.5, jnp.ones(3))


def test_max_z_is_distance_plus_threshold():
    stats = ClusterStats(jnp.array([[0.0, 0.0], [4.0, 4.0]]), jnp.ones((2, 2)), jnp.array(1))
    x = jnp.array([[0.5, -2.0], [4.0, 7.0]])
    np.testing.assert_allclose(max_z(stats, x), [2.0, 3.0], rtol=1e-5)
    np.testing.assert_allclose(distance(stats, x, threshold=2.5), [-0.5, 0.5], rtol=1e-5)


def test_yielding_raises_identity_weight_far_away_and_leaves_centre_tokens_alone():
    stats = ClusterStats(jnp.array([[0.0, 0.0], [4.0, 4.0]]), jnp.ones((2, 2)), jnp.array(1))
    tokens = jnp.array([[4.0, 4.0], [30.0, -20.0]])  # at a centre; far from both
    d = distance(stats, tokens)
    logits = jnp.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])  # 2 LoRA experts, 1 identity
    before = top_k_weights(logits, 2)
    after = top_k_weights(yield_logits(logits, d, 1, 1.0), 2)
    np.testing.assert_array_equal(after[0], before[0])
    assert float(split_gates(after, 1)[1][1, 0]) > 0.99 > float(split_gates(before, 1)[1][1, 0])
    np.testing.assert_array_equal(yield_logits(logits, d, 1, 1.0)[:, :2], logits[:, :2])


def test_yield_checks_its_arguments():
    with pytest.raises(ConfigError, match="num_identity"):
        yield_logits(jnp.zeros((2, 3)), jnp.zeros(2), 4)
    with pytest.raises(ShapeError, match="one per token"):
        yield_logits(jnp.zeros((2, 3)), jnp.zeros(3), 1)
    with pytest.raises(ShapeError, match="token_weights"):
        update_clusters(empty_clusters(2, 3), jnp.ones((4, 3)), jnp.ones(5))
    with pytest.raises(ConfigError, match="momentum"):
        update_clusters(empty_clusters(2, 3), jnp.ones((4, 3)), None, 1.5)


def numpy_max_z(mean, var, x, eps=1e-6, floor=0.0):
    """max_j |x_j - mu_c*,j| / sigma_c*,j in float64, sigma floored at floor * the layer's typical
    standard deviation (the root mean of the variances)."""
    mean, var, x = (np.asarray(a, np.float64) for a in (mean, var, x))
    near = np.argmin(((x[..., None, :] - mean) ** 2).sum(-1), axis=-1)
    sigma = np.sqrt(np.maximum(var, floor**2 * var.mean()) + eps)
    return near, np.max(np.abs(x - mean[near]) / sigma[near], axis=-1)


def test_an_all_padding_first_batch_initialises_nothing():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    stats = jax.jit(init_from_tokens, static_argnums=2)(x, jax.random.key(1), 3, jnp.zeros((2, 5)))
    empty = empty_clusters(3, 4)
    assert int(stats.count) == 0  # the next batch with a real token initialises instead
    np.testing.assert_array_equal(stats.mean, empty.mean)
    np.testing.assert_array_equal(stats.var, empty.var)
    one_real = jnp.zeros((2, 5)).at[1, 2].set(1.0)
    again = init_from_tokens(x, jax.random.key(1), 3, one_real)
    assert int(again.count) == 1
    np.testing.assert_array_equal(again.mean, np.broadcast_to(x[1, 2], (3, 4)))


def test_a_dead_channel_does_not_decide_the_distance():
    rng = np.random.default_rng(3)
    d = 16
    mean = rng.normal(size=(2, d)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=(2, d)).astype(np.float32)
    var[:, 5] = 0.0  # a channel that never moved while the clusters were fitted
    x = mean[0] + 0.5 * np.sqrt(var[0]) * rng.choice([-1.0, 1.0], size=d)
    x[5] = mean[0, 5] + 0.01  # a tiny wiggle in the dead channel
    x = x.astype(np.float32)[None]
    stats = ClusterStats(jnp.asarray(mean), jnp.asarray(var), jnp.array(1))
    _, unfloored = numpy_max_z(mean, var, x)
    assert unfloored[0] == pytest.approx(10.0, rel=1e-3)  # sqrt(1e-6): the old absolute floor
    near, want = numpy_max_z(mean, var, x, floor=0.1)
    got = jax.jit(max_z, static_argnums=(2, 3))(stats, jnp.asarray(x), 1e-6, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got[0]) < 1.0 and int(near[0]) == 0  # the in-domain token stays in-domain
    np.testing.assert_allclose(distance(stats, jnp.asarray(x), 1e-6, 1.0, 0.1), want - 1.0,
                               rtol=1e-5)
    sigma = cluster_sigma(stats, 1e-6, 0.1)
    np.testing.assert_allclose(sigma[:, 5], 0.1 * np.sqrt(var.mean()), rtol=1e-3)
    np.testing.assert_allclose(sigma[:, 0], np.sqrt(var[:, 0] + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nearest_centre_is_exact_under_a_large_common_offset(dtype):
    # Activations with a common offset ~50 and centres ~0.3 apart: the expansion
    # |mu|^2 - 2 x.mu cancelled away the differences (27% wrong in f32, 88% in bf16).
    rng = np.random.default_rng(4)
    d, c, t = 64, 8, 512
    offset = 50.0 + rng.normal(size=d)
    mean = (offset + 0.3 * rng.normal(size=(c, d))).astype(np.float32)
    x = jnp.asarray(offset + 0.3 * rng.normal(size=(t, d)), dtype)
    var = np.full((c, d), 0.09, np.float32)
    stats = ClusterStats(jnp.asarray(mean), jnp.asarray(var), jnp.array(1))
    tokens = np.asarray(x.astype(jnp.float32))  # the values the layer sees, exactly
    near, want = numpy_max_z(mean, var, tokens)
    np.testing.assert_array_equal(jax.jit(nearest_cluster)(stats, x), near)
    z = jax.jit(max_z)(stats, x)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, want, rtol=1e-4)
    updated = update_clusters(stats, x, None, 0.9)  # assigns through the same nearest centre
    ref_mean, ref_var = numpy_update(mean, var, tokens, np.ones(t, np.float32), 0.9)
    np.testing.assert_allclose(updated.mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated.var, ref_var, rtol=1e-3, atol=1e-5)
