"""The SLIM L1 penalty against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core.penalties import lora_l1, slim_l1
from slim_jax.errors import ShapeError


def test_l1_sums_per_expert_means_over_layers():
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(3, 6, 2)), rng.normal(size=(3, 2, 4))),
              (rng.normal(size=(5, 2)), rng.normal(size=(2, 7)))]
    ref = sum(np.abs(a).mean(axis=(-2, -1)).sum() + np.abs(b).mean(axis=(-2, -1)).sum()
              for a, b in layers)
    got = jax.jit(lambda f: slim_l1(f))([(jnp.asarray(a), jnp.asarray(b)) for a, b in layers])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_l1_rejects_unpaired_experts():
    with pytest.raises(ShapeError):
        lora_l1(jnp.ones((3, 4, 2)), jnp.ones((2, 2, 5)))
