"""LoRAHub composition: factor-wise sums, pinned cross terms, populations, stacking errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core.compose import compose, compose_population, stack_adapters
from slim_jax.errors import ShapeError


def random_adapters(n, d_in=5, rank=2, d_out=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"layers": {0: {"q": {"lora_a": rng.normal(size=(d_in, rank)).astype(np.float32),
                              "lora_b": rng.normal(size=(rank, d_out)).astype(np.float32)}}}}
        for _ in range(n)
    ]


def test_compose_is_factorwise_weighted_sum():
    adapters = random_adapters(3)
    w = np.array([0.3, -1.2, 0.7], np.float32)
    got = jax.jit(compose)(jnp.asarray(w), stack_adapters(adapters))["layers"][0]["q"]
    for name in ("lora_a", "lora_b"):
        ref = sum(wi * ad["layers"][0]["q"][name] for wi, ad in zip(w, adapters, strict=True))
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6)


def test_composed_delta_has_cross_terms_not_weighted_deltas():
    # Scalars make the cross terms visible: A = (1, 2), B = (1, 3), w = (0.5, 0.5).
    stacked = (jnp.array([[[1.0]], [[2.0]]]), jnp.array([[[1.0]], [[3.0]]]))
    a_hat, b_hat = compose(jnp.array([0.5, 0.5]), stacked)
    assert float((a_hat @ b_hat)[0, 0]) == pytest.approx(3.0)  # (0.5 + 1) * (0.5 + 1.5)
    weighted_deltas = 0.5 * 1.0 * 1.0 + 0.5 * 2.0 * 3.0
    assert weighted_deltas == pytest.approx(3.5)
    # In general: A_hat B_hat = sum_ij w_i w_j A_i B_j.
    adapters = random_adapters(3, seed=1)
    w = np.array([0.4, 0.9, -0.5], np.float32)
    comp = compose(jnp.asarray(w), stack_adapters(adapters))["layers"][0]["q"]
    a = [ad["layers"][0]["q"]["lora_a"] for ad in adapters]
    b = [ad["layers"][0]["q"]["lora_b"] for ad in adapters]
    cross = sum(w[i] * w[j] * a[i] @ b[j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(comp["lora_a"] @ comp["lora_b"], cross, rtol=1e-4, atol=1e-5)
    naive = sum(w[i] * a[i] @ b[i] for i in range(3))
    assert np.abs(np.asarray(comp["lora_a"] @ comp["lora_b"]) - naive).max() > 0.1


def test_population_equals_python_loop():
    stacked = stack_adapters(random_adapters(4, seed=2))
    population = jax.random.uniform(jax.random.key(0), (6, 4), minval=-1.5, maxval=1.5)
    got = jax.jit(compose_population)(population, stacked)
    for p in range(6):
        one = compose(population[p], stacked)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(x[p], y, rtol=1e-6, atol=1e-6)
    vmapped = jax.vmap(compose, in_axes=(0, None))(population, stacked)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(vmapped), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_adapters_of_different_rank_name_the_layer():
    adapters = random_adapters(2) + random_adapters(1, rank=4)
    with pytest.raises(ShapeError, match=r"adapter 2 has shape \(5, 4\) at layers/0/q/lora_a"):
        stack_adapters(adapters)


def test_adapters_of_different_layers_are_named():
    other = {"layers": {1: random_adapters(1)[0]["layers"][0]}}
    with pytest.raises(ShapeError, match="layers/1/q/lora_a"):
        stack_adapters([random_adapters(1)[0], other])


def test_weights_must_match_the_stack():
    stacked = stack_adapters(random_adapters(3))
    with pytest.raises(ShapeError, match="leading axis of 2"):
        compose(jnp.ones(2), stacked)
    with pytest.raises(ShapeError, match=r"\[P, N\]"):
        compose_population(jnp.ones(3), stacked)
