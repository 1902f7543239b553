"""The searches: a constructed problem with a known optimum, budgets, bounds, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slim_jax.data import ByteTokenizer
from slim_jax.data.layout import TokenizedExample
from slim_jax.errors import ConfigError
from slim_jax.lorahub import (
    ModuleLibrary,
    build_objective,
    cmaes_search,
    cobyla_search,
    fold,
    gradient_search,
    objective_layout,
    search,
)
from slim_jax.lorahub.toy import QuadraticObjective
from slim_jax.models.generate import generate
from tests.lorahub.conftest import random_modules, target_layers, tiny_llama

W_STAR = np.array([0.9, -0.6, 0.0, 1.2], np.float32)
value = jax.jit(lambda objective, w: objective(w))


@pytest.fixture(scope="module")
def constructed():
    """Four modules and ADAPT targets written by the composition `W_STAR`: greedy continuations
    of random prompts by the model with `W_STAR` merged, so `W_STAR` reproduces the target
    adapter and its objective is the optimum to reach (or its mirror `-W_STAR`: the product
    A_hat B_hat is even in w)."""
    model = tiny_llama()
    layers = target_layers(model, ("lm_head", "q_proj", "v_proj"))
    attached = ModuleLibrary.from_modules(random_modules(layers, 4, scale=0.5, seed=3)).attach(
        model)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 259, size=rng.integers(4, 12)).tolist()] for _ in range(5)]
    targets = generate(attached.merged_model(W_STAR), prompts, max_new_tokens=8, stop_ids=())
    examples = [TokenizedExample(np.array(p, np.int32), np.array(t, np.int32))
                for p, t in zip(prompts, targets.tokens, strict=True)]
    return build_objective(attached, examples, objective_layout(model, ByteTokenizer()))


def test_cmaes_finds_the_constructed_optimum(constructed):
    optimum = float(value(constructed, jnp.asarray(W_STAR)))
    start = float(value(constructed, jnp.zeros(4)))
    assert start > 2 * optimum  # the problem is not solved by doing nothing
    result = cmaes_search(constructed, budget=480, population_size=16, seed=0)
    assert result.objective <= 1.05 * optimum
    assert result.evaluations == 480 and result.values.shape == (480,)
    # The reported best is the best evaluated, and its objective is reproducible.
    assert result.objective == pytest.approx(result.values.min())
    assert float(value(constructed, jnp.asarray(result.weights))) == pytest.approx(
        result.objective, rel=1e-5)
    np.testing.assert_allclose(np.abs(result.weights), np.abs(W_STAR), atol=0.15)


def test_cobyla_reference_optimiser_on_the_constructed_problem(constructed):
    optimum = float(value(constructed, jnp.asarray(W_STAR)))
    result = cobyla_search(constructed, budget=160)
    assert result.evaluations == 160
    assert result.values[0] == pytest.approx(float(value(constructed, jnp.zeros(4))))
    assert result.objective <= 1.05 * optimum


def test_sequential_scoring_follows_the_same_search(constructed):
    vmapped = cmaes_search(constructed, budget=32, population_size=8, seed=1)
    sequential = cmaes_search(constructed, budget=32, population_size=8, seed=1,
                              scoring="sequential")
    np.testing.assert_allclose(sequential.values, vmapped.values, rtol=1e-4)


def test_population_split_over_devices_gives_the_same_search():
    f = QuadraticObjective.around([0.3, -0.2, 0.1])
    split = cmaes_search(f, budget=64, population_size=16, seed=2)  # "auto": 8 devices
    single = cmaes_search(f, budget=64, population_size=16, seed=2, mesh=None)
    np.testing.assert_allclose(split.values, single.values, rtol=1e-5, atol=1e-7)


def test_history_is_best_so_far_and_first_candidate_is_the_start():
    f = QuadraticObjective.around([1.0, -1.0], offset=0.5)
    result = cmaes_search(f, budget=40, population_size=8)
    assert result.values[0] == pytest.approx(2.5)  # w = 0: the base model comes first
    assert np.all(np.diff(result.history) <= 0)
    assert result.history[-1] == pytest.approx(result.objective)
    assert np.all(np.abs(result.weights) <= 1.5)


def test_budget_not_a_multiple_of_the_population_is_left_unspent():
    result = cmaes_search(QuadraticObjective.around([0.0, 0.0]), budget=30, population_size=8)
    assert result.evaluations == 24


def test_out_of_box_optimum_is_folded_to_the_wall():
    f = QuadraticObjective.around([3.0, -3.0])
    for result in (cmaes_search(f, budget=160, population_size=16),
                   cobyla_search(f, budget=60),
                   gradient_search(f, budget=60, learning_rate=0.2)):
        assert np.all(np.abs(result.weights) <= 1.5 + 1e-6), result.method
        np.testing.assert_allclose(result.weights, [1.5, -1.5], atol=0.1)


def test_gradient_search_starts_at_the_uniform_average():
    f = QuadraticObjective.around([0.0, 0.0, 0.0, 0.0])
    result = gradient_search(f, budget=3)
    assert result.values[0] == pytest.approx(4 * 0.25**2)


def test_search_dispatch_and_errors():
    f = QuadraticObjective.around([0.0, 0.0])
    assert search(f, "cobyla", budget=5).evaluations == 5
    with pytest.raises(ConfigError, match="smaller than one generation of population_size=8"):
        cmaes_search(f, budget=7, population_size=8)
    with pytest.raises(ConfigError, match="unknown search method 'nelder'"):
        search(f, "nelder")
    with pytest.raises(ConfigError, match="budget must be >= 1"):
        cobyla_search(f, budget=0)
    with pytest.raises(ConfigError, match="population of at least 2"):
        cmaes_search(f, budget=8, population_size=1)
    with pytest.raises(ConfigError, match="expected an objective"):
        cmaes_search(object(), budget=8)


@given(st.floats(-100, 100, allow_nan=False))
def test_fold_lands_in_the_box_and_is_identity_inside(x):
    y = float(fold(jnp.float32(x), 1.5))
    assert -1.5 - 1e-5 <= y <= 1.5 + 1e-5
    if abs(x) <= 1.5:
        assert y == pytest.approx(x, abs=1e-5)
    # A mirror: folding x and its reflection at the wall agree.
    assert float(fold(jnp.float32(3.0 - x), 1.5)) == pytest.approx(y, abs=1e-4)
