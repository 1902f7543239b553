"""SlimLinear's clusters under awkward inputs: an all-padding first batch, a dead channel, and
router logits in float32 whatever the compute dtype (against NumPy references)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.nn import SlimConfig, SlimLinear

CFG = SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                 num_clusters=2, momentum=0.9)


def test_an_all_padding_first_batch_leaves_the_clusters_uninitialised(randomize):
    layer = SlimLinear(8, 6, CFG, rngs=nnx.Rngs(0))
    randomize(layer)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    plain = SlimLinear(8, 6, SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2,
                                        rank=2, alpha=4, yielding=False), rngs=nnx.Rngs(0))
    plain.router[...] = layer.router[...]
    gates = layer.routing_weights(x, jnp.zeros((2, 5)))
    assert int(layer.cluster_count[...]) == 0  # waits for real tokens
    np.testing.assert_array_equal(gates, plain.routing_weights(x))  # and yields nothing
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0.0
    layer.routing_weights(x, jnp.asarray(mask))
    assert int(layer.cluster_count[...]) == 1
    real = np.asarray(x).reshape(-1, 8)[mask.reshape(-1) > 0]
    np.testing.assert_allclose(layer.cluster_var[...], np.broadcast_to(real.var(0), (2, 8)),
                               rtol=1e-5)
    assert all(any(np.allclose(c, t) for t in real) for c in np.asarray(layer.cluster_mean[...]))


def test_a_dead_channel_does_not_make_an_in_domain_token_yield(randomize):
    layer = SlimLinear(8, 6, CFG, rngs=nnx.Rngs(0))
    randomize(layer)
    layer.cluster_mean[...] = jnp.zeros((2, 8)).at[1].set(5.0)
    layer.cluster_var[...] = jnp.ones((2, 8)).at[:, 0].set(0.0)  # channel 0 never moved
    layer.cluster_count[...] = jnp.array(5, jnp.int32)
    layer.eval()
    x = jnp.full((1, 8), 0.3).at[0, 0].set(0.01)
    plain = SlimLinear(8, 6, SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2,
                                        rank=2, alpha=4, yielding=False), rngs=nnx.Rngs(0))
    plain.router[...] = layer.router[...]
    # sigma_0 = 0.1 * sqrt(7/8): z_0 = 0.11 < t = 1 (with sqrt(1e-6) it was z_0 = 10: yield).
    np.testing.assert_array_equal(layer.routing_weights(x), plain.routing_weights(x))


def test_router_logits_are_float32_with_a_bf16_compute_dtype(randomize):
    cfg = SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=5, rank=2, alpha=4,
                     yielding=False, dtype="bfloat16")
    layer = SlimLinear(64, 6, cfg, rngs=nnx.Rngs(0))
    randomize(layer)
    x = 3.0 * jax.random.normal(jax.random.key(2), (16, 64))
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(layer.routing_weights(x), want, rtol=1e-5, atol=1e-6)
