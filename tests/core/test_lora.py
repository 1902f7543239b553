"""LoRA scale, delta and initialisers against NumPy and PEFT's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core.lora import init_lora_a, init_lora_b, lora_delta, lora_scale
from slim_jax.errors import ConfigError, ShapeError


def test_scale_is_alpha_over_rank_or_its_root():
    assert lora_scale(32, 16) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    with pytest.raises(ConfigError, match="rank"):
        lora_scale(32, 0)


def test_delta_matches_dense_product():
    rng = np.random.default_rng(0)
    x, a, b = rng.normal(size=(2, 5, 6)), rng.normal(size=(6, 3)), rng.normal(size=(3, 4))
    got = jax.jit(lora_delta)(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), 0.5)
    np.testing.assert_allclose(got, 0.5 * x @ (a @ b), rtol=1e-5, atol=1e-6)


def test_delta_rejects_mismatched_factors():
    with pytest.raises(ShapeError, match=r"a \(6, 3\), b \(2, 4\)"):
        lora_delta(jnp.ones((1, 6)), jnp.ones((6, 3)), jnp.ones((2, 4)), 1.0)


def test_kaiming_uniform_is_peft_default_bound():
    d_in, rank = 64, 8
    a = np.asarray(init_lora_a(jax.random.key(0), (4, d_in, rank)))
    bound = 1 / math.sqrt(d_in)
    assert a.shape == (4, d_in, rank)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.95 * bound  # fills the interval
    np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.1)  # variance of U(-c, c)


def test_kaiming_uniform_bound_equals_torch_kaiming_a_sqrt5():
    torch = pytest.importorskip("torch")
    d_in, rank = 64, 8
    weight = torch.empty(rank, d_in)  # PEFT's lora_A.weight is [r, d_in]
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    np.testing.assert_allclose(weight.abs().max().item(), 1 / math.sqrt(d_in), rtol=0.05)


def test_gaussian_init_has_std_one_over_rank():
    a = np.asarray(init_lora_a(jax.random.key(1), (256, 4), "gaussian"))
    np.testing.assert_allclose(a.std(), 1 / 4, rtol=0.1)
    with pytest.raises(ConfigError, match="kaiming_uniform"):
        init_lora_a(jax.random.key(1), (4, 4), "orthogonal")


def test_b_starts_at_zero():
    assert not np.any(np.asarray(init_lora_b((3, 5), jnp.bfloat16)))
    assert init_lora_b((3, 5), jnp.bfloat16).dtype == jnp.bfloat16
