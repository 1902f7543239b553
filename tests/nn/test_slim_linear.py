"""SlimLinear: identity routing and B = 0 are the base, the SLIM formula, yielding, clusters,
dynamic merging, modes, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.core.clustering import ClusterStats, max_z, token_quantile, update_clusters
from slim_jax.errors import ShapeError
from slim_jax.nn import AdapterParam, ClusterState, LoRAConfig, LoRALinear, SlimConfig, SlimLinear

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

CFG = SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                 num_clusters=2, momentum=0.9)


def make(config=CFG, seed=0, **kwargs):
    return SlimLinear(8, 6, config, rngs=nnx.Rngs(seed), **kwargs)


def set_clusters(layer, mean, var):
    layer.cluster_mean[...] = jnp.asarray(mean, jnp.float32)
    layer.cluster_var[...] = jnp.asarray(var, jnp.float32)
    layer.cluster_count[...] = jnp.array(1, jnp.int32)


def numpy_forward(layer, x, yielding_d=None):
    """SLIM.md s1 token by token: logits, (yielding), top-k softmax, gated expert sum."""
    cfg = layer.config
    w, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    a, b, r = (np.asarray(v[...]) for v in (layer.experts_a, layer.experts_b, layer.router))
    flat = np.asarray(x).reshape(-1, x.shape[-1])
    out = []
    for t, tok in enumerate(flat):
        logits = tok @ r
        if yielding_d is not None:
            logits[cfg.num_lora_experts:] += cfg.yield_strength * max(yielding_d[t], 0.0)
        top = np.argsort(-logits, kind="stable")[: cfg.top_k]
        g = np.zeros_like(logits)
        g[top] = np.exp(logits[top] - logits[top].max())
        g /= g.sum()
        y = tok @ w + bias
        for e in range(cfg.num_lora_experts):
            y = y + g[e] * cfg.scale * (tok @ a[e]) @ b[e]
        out.append(y)
    return np.stack(out).reshape(*x.shape[:-1], -1)


def test_all_identity_routing_equals_base_exactly(randomize):
    base = nnx.Linear(8, 6, rngs=nnx.Rngs(3))
    layer = SlimLinear.from_linear(base, CFG, rngs=nnx.Rngs(1))
    randomize(layer)
    # Positive inputs and a router that scores identity experts high: top-2 = the two identities.
    router = np.full((8, 5), -1.0, np.float32)
    router[:, 3:] = 1.0
    layer.router[...] = jnp.asarray(router)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 8), minval=0.5, maxval=1.5)
    for mode in (False, True):
        layer.use_running_average = mode
        np.testing.assert_array_equal(layer(x), base(x))


def test_zero_b_equals_base_exactly_in_both_modes(tokens):
    base = nnx.Linear(8, 6, rngs=nnx.Rngs(3))
    layer = SlimLinear.from_linear(base, SlimConfig(rank=2, num_clusters=2, dropmerge_p=0.5),
                                   rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer(tokens), base(tokens))
    layer.eval()
    np.testing.assert_array_equal(layer(tokens), base(tokens))


def test_forward_matches_numpy_without_yielding(tokens, randomize):
    layer = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                            alpha=4, yielding=False))
    randomize(layer)
    got = nnx.jit(lambda m, x: m(x))(layer, tokens)
    np.testing.assert_allclose(got, numpy_forward(layer, tokens), rtol=1e-5, atol=1e-5)


def test_forward_matches_numpy_with_yielding_at_inference(tokens, randomize):
    layer = make()
    randomize(layer)
    mean = np.array([np.zeros(8), np.ones(8)], np.float32)
    var = np.full((2, 8), 0.25, np.float32)
    set_clusters(layer, mean, var)
    layer.eval()
    flat = np.asarray(tokens).reshape(-1, 8)
    near = np.argmin(((flat[:, None] - mean) ** 2).sum(-1), axis=1)
    d = np.max(np.abs(flat - mean[near]) / np.sqrt(var[near] + CFG.cluster_eps), -1) - 1
    assert (d > 0).any()
    np.testing.assert_allclose(layer(tokens), numpy_forward(layer, tokens, d), rtol=1e-5,
                               atol=1e-5)


def test_yielding_moves_far_tokens_to_identity_and_leaves_centre_tokens(randomize):
    layer = make()
    randomize(layer)
    set_clusters(layer, [np.zeros(8), np.full(8, 2.0)], np.ones((2, 8)))
    layer.eval()
    at_centre = jnp.full((1, 8), 2.0)
    far = jnp.concatenate([jnp.full((1, 4), 40.0), jnp.full((1, 4), -40.0)], axis=1)
    x = jnp.concatenate([at_centre, far])
    with_yield = layer.routing_weights(x)
    plain = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                            alpha=4, yielding=False))
    plain.router[...] = layer.router[...]
    without = plain.routing_weights(x)
    np.testing.assert_array_equal(with_yield[0], without[0])
    assert float(with_yield[1, 3:].sum()) > 0.999
    assert float(with_yield[1, 3:].sum()) > float(without[1, 3:].sum())


def test_yield_threshold_spares_tokens_within_it(randomize):
    x = jnp.concatenate([jnp.full((1, 4), 3.0), jnp.zeros((1, 4))], axis=1)  # z = 3 on 4 channels
    gates = {}
    for threshold in (1.0, 4.0):
        layer = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                                alpha=4, num_clusters=2, yield_strength=50.0,
                                yield_threshold=threshold))
        randomize(layer)
        set_clusters(layer, [np.zeros(8), np.full(8, 20.0)], np.ones((2, 8)))
        layer.eval()
        gates[threshold] = layer.routing_weights(x)
    plain = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                            alpha=4, yielding=False))
    randomize(plain)
    # t = 1: d = 2, the identity experts take the token; t = 4: d < 0, routing as without yielding.
    assert float(gates[1.0][0, 3:].sum()) > 0.999
    np.testing.assert_array_equal(gates[4.0], plain.routing_weights(x))


def test_yield_quantile_tracks_the_training_tokens_and_spares_most_of_them(randomize):
    cfg = SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                     num_clusters=2, momentum=0.5, yield_strength=50.0, yield_quantile=0.75)
    layer = make(cfg)
    randomize(layer)
    x1, x2 = (jax.random.normal(jax.random.key(k), (4, 16, 8)) for k in (1, 2))
    layer(x1)  # first batch: the cutoff is the batch's 0.75-quantile of max_j |z_j|
    want = token_quantile(max_z(layer.cluster_stats, x1), 0.75)
    np.testing.assert_allclose(layer.yield_cutoff[...], want, rtol=1e-6)
    layer(x2)  # then an EMA with the clusters' momentum
    want = 0.5 * want + 0.5 * token_quantile(max_z(layer.cluster_stats, x2), 0.75)
    np.testing.assert_allclose(layer.yield_cutoff[...], want, rtol=1e-6)
    layer.eval()
    plain = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                            alpha=4, yielding=False))
    randomize(plain)
    far = np.asarray(max_z(layer.cluster_stats, x2) > layer.yield_cutoff[...])
    # About a quarter of in-domain tokens yield (the spec's t = 1 would take nearly all of them),
    # and only those: the others keep the routing without yielding.
    assert 0.1 < float(far.mean()) < 0.45
    gates, without = layer.routing_weights(x2), plain.routing_weights(x2)
    np.testing.assert_array_equal(np.asarray(gates)[~far], np.asarray(without)[~far])
    assert (np.asarray(gates[..., 3:].sum(-1))[far] >= np.asarray(without[..., 3:].sum(-1))[far]
            - 1e-6).all()


def test_untrained_clusters_do_not_yield(tokens, randomize):
    layer = make()
    randomize(layer)
    plain = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2,
                            alpha=4, yielding=False))
    nnx.update(plain, nnx.state(layer, AdapterParam))
    layer.eval()
    np.testing.assert_array_equal(layer(tokens), plain(tokens))


def test_training_initialises_then_updates_clusters_and_ignores_padding():
    layer = make()
    x1 = jax.random.normal(jax.random.key(1), (2, 5, 8))
    layer(x1)
    flat = {tuple(t) for t in np.asarray(x1).reshape(-1, 8)}
    assert int(layer.cluster_count[...]) == 1
    assert {tuple(c) for c in np.asarray(layer.cluster_mean[...])} <= flat
    stats = layer.cluster_stats
    x2 = jax.random.normal(jax.random.key(2), (2, 5, 8))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    x2_padded = jnp.where(mask[..., None] > 0, x2, 1e4)  # padding far away: must not count
    layer(x2_padded, token_mask=mask)
    ref = update_clusters(stats, x2, mask, 0.9)
    np.testing.assert_allclose(layer.cluster_mean[...], ref.mean, rtol=1e-6)
    np.testing.assert_allclose(layer.cluster_var[...], ref.var, rtol=1e-6)
    assert int(layer.cluster_count[...]) == 2


def test_inference_freezes_clusters(tokens):
    layer = make()
    layer(tokens)
    stats = layer.cluster_stats
    layer.eval()
    layer(tokens * 3)
    for x, y in zip(layer.cluster_stats, stats, strict=True):
        np.testing.assert_array_equal(x, y)


def test_modes_follow_train_eval_and_view():
    layer = make()
    assert layer.use_running_average is False
    layer.eval()
    assert layer.use_running_average is True
    layer.train()
    assert nnx.view(layer, use_running_average=True).use_running_average is True
    assert layer.use_running_average is False


def test_dynamic_merging_draws_fresh_masks_at_inference_only(tokens, randomize):
    cfg = SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                     yielding=False, dropmerge_p=0.5)
    layer = make(cfg)
    randomize(layer)
    np.testing.assert_array_equal(layer(tokens), layer(tokens))  # training: no masks
    layer.eval()
    clone = nnx.clone(layer)
    first = layer(tokens)
    assert not np.allclose(first, layer(tokens))  # a fresh mask pair per call
    np.testing.assert_array_equal(clone(tokens), first)  # same stream state, same answer
    nnx.reseed(layer, slim=7)
    reseeded = layer(tokens)
    nnx.reseed(layer, slim=7)
    np.testing.assert_array_equal(layer(tokens), reseeded)
    off = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, top_k=2, rank=2, alpha=4,
                          yielding=False))
    nnx.update(off, nnx.state(layer, AdapterParam))
    off.eval()
    layer.train()
    np.testing.assert_array_equal(off(tokens), layer(tokens))  # p = 0 == unmasked


def test_dense_routing_uses_every_expert(tokens, randomize):
    layer = make(SlimConfig(num_lora_experts=3, num_identity_experts=2, dense_routing=True,
                            rank=2, num_clusters=2))
    randomize(layer)
    assert np.all(np.asarray(layer.routing_weights(tokens)) > 0)


def test_single_expert_without_router_is_plain_lora(tokens, randomize):
    cfg = SlimConfig(num_lora_experts=1, num_identity_experts=0, top_k=1, yielding=False,
                     rank=2, alpha=4)
    base = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    slim = SlimLinear.from_linear(base, cfg, rngs=nnx.Rngs(1))
    lora = LoRALinear.from_linear(base, LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
    randomize(lora)
    assert slim.router is None
    slim.experts_a[...] = lora.lora_a[...][None]
    slim.experts_b[...] = lora.lora_b[...][None]
    np.testing.assert_allclose(slim(tokens), lora(tokens), rtol=1e-6, atol=1e-6)


def test_gradients_reach_adapters_and_router_but_not_cluster_state(tokens, randomize):
    layer = make()
    randomize(layer)
    layer(tokens)  # initialise the clusters

    def loss(m):
        return jnp.sum(m(tokens) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(nnx.clone(layer))
    assert set(grads) == {"experts_a", "experts_b", "router"}
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
    float_clusters = nnx.All(ClusterState, lambda path, _: path[-1] != "cluster_count")
    for inference in (False, True):  # updated statistics, then frozen ones
        layer.use_running_average = inference
        cluster_grads = nnx.grad(loss, argnums=nnx.DiffState(0, float_clusters))(
            nnx.clone(layer))
        assert set(cluster_grads) == {"cluster_mean", "cluster_var"}
        for g in jax.tree.leaves(cluster_grads):
            np.testing.assert_array_equal(g, 0.0)


def test_token_mask_of_wrong_shape_is_named(tokens):
    with pytest.raises(ShapeError, match=r"token mask of shape \(2, 4\)"):
        make()(tokens, token_mask=jnp.ones((2, 4)))


def test_routing_weights_are_sown_under_capture(tokens):
    _, captured = nnx.capture(make(), nnx.Intermediate)(tokens)
    (gates,) = captured["routing_weights"].get_value()
    assert gates.shape == (2, 5, 5)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)


def test_bf16_base_keeps_fp32_adapters_and_cluster_state(tokens):
    base = nnx.Linear(8, 6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer = SlimLinear.from_linear(base, CFG, rngs=nnx.Rngs(1))
    y = layer(tokens)
    assert y.dtype == jnp.bfloat16
    assert layer.experts_a.dtype == jnp.float32 and layer.cluster_mean.dtype == jnp.float32
    assert isinstance(layer.cluster_stats, ClusterStats)
