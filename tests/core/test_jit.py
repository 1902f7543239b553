"""Every public core function compiles under `jax.jit` and gives its eager answer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core import clustering, dropmerge, merging, routing

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (2, 3, 4))
STATS = clustering.ClusterStats(jnp.zeros((2, 4)), jnp.ones((2, 4)), jnp.array(1))
T = jax.random.normal(jax.random.key(1), (3, 4, 5))
EA, EB = jax.random.normal(KEY, (2, 4, 2)), jax.random.normal(KEY, (2, 2, 5))
MASKS = dropmerge.channel_masks(KEY, 4, 5, 0.3)

CASES = {
    "top_k_weights": (functools.partial(routing.top_k_weights, k=2), (X,)),
    "dense_weights": (routing.dense_weights, (X,)),
    "nearest_cluster": (clustering.nearest_cluster, (STATS, X)),
    "yield_logits": (functools.partial(clustering.yield_logits, num_identity=1),
                     (X, X[..., 0])),
    "channel_masks": (lambda k: dropmerge.channel_masks(k, 4, 5, 0.3), (KEY,)),
    "masked_mixture_delta": (
        lambda x, a, b, g: dropmerge.masked_mixture_delta(x, a, b, g, 2.0, MASKS, 0.3),
        (X, EA, EB, X[..., :2]),
    ),
    "linear": (merging.linear, (EA, EB, jnp.array([0.5, -1.0]))),
    "magnitude_trim": (functools.partial(merging.magnitude_trim, density=0.3), (T,)),
    "dare_ties": (lambda k, t: merging.dare_ties(k, t, jnp.ones(3), 0.5), (KEY, T)),
    "lora_deltas": (merging.lora_deltas, (EA, EB)),
    "delta_to_lora": (functools.partial(merging.delta_to_lora, rank=2), (T[0],)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_equals_eager(name):
    fn, args = CASES[name]
    for got, ref in zip(jax.tree.leaves(jax.jit(fn)(*args)), jax.tree.leaves(fn(*args)),
                        strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
