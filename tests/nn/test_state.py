"""Adapter state: selection, vmapped populations over one frozen base, merging, token masks,
the L1 penalty, and optimiser steps that touch adapters only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slim_jax.core.compose import compose, compose_population, stack_adapters
from slim_jax.core.penalties import lora_l1
from slim_jax.errors import ConfigError, ShapeError
from slim_jax.nn import (
    AdapterParam,
    LoRAConfig,
    SlimConfig,
    adapter_apply,
    adapter_l1,
    adapter_paths,
    adapter_state,
    inject,
    merge_adapters,
    set_token_mask,
    split_adapters,
    token_mask,
    unmerge_adapters,
)

LORA = LoRAConfig(rank=2, alpha=4)
SLIM = SlimConfig(rank=2, num_clusters=2, num_lora_experts=2, num_identity_experts=1)


def test_adapter_state_holds_only_adapter_params(toy):
    inject(toy, "q_proj|v_proj", LORA, rngs=nnx.Rngs(1))
    inject(toy, "up_proj", SLIM, rngs=nnx.Rngs(2))
    state = adapter_state(toy)
    leaves = nnx.to_flat_state(state)
    assert all(isinstance(v, AdapterParam) for _, v in leaves)
    assert {"/".join(map(str, p)) for p, _ in leaves} >= {
        "layers/0/attn/q_proj/lora_a", "layers/1/up_proj/router", "layers/1/up_proj/experts_b"}
    assert adapter_paths(toy)[:2] == ["layers/0/attn/q_proj", "layers/0/attn/v_proj"]


def test_population_under_vmap_equals_python_loop(toy, tokens, randomize):
    inject(toy, "q_proj|v_proj", LORA, rngs=nnx.Rngs(1))
    toy.eval()
    modules = []
    for seed in range(3):  # three "upstream" LoRA modules of the same shapes
        randomize(toy, seed=seed)
        modules.append(adapter_state(toy))
    stacked = stack_adapters(modules)
    population = jax.random.uniform(jax.random.key(0), (4, 3), minval=-1.5, maxval=1.5)

    graphdef, _, rest = split_adapters(toy)
    apply = adapter_apply(graphdef, lambda m, x: m(x))

    @jax.jit
    def score(weights, rest, x):
        candidates = compose_population(weights, stacked)
        return jax.vmap(apply, in_axes=(0, None, None))(candidates, rest, x)

    got = score(population, rest, tokens)
    for p in range(4):
        nnx.update(toy, compose(population[p], stacked))
        np.testing.assert_allclose(got[p], toy(tokens), rtol=1e-5, atol=1e-5)


def test_stacking_adapters_of_different_rank_names_the_layer(toy_cls):
    small, large = toy_cls(nnx.Rngs(0)), toy_cls(nnx.Rngs(0))
    inject(small, "q_proj", LORA, rngs=nnx.Rngs(1))
    inject(large, "q_proj", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    with pytest.raises(ShapeError, match=r"at layers/0/attn/q_proj/lora_a"):
        stack_adapters([adapter_state(small), adapter_state(large)])


def test_merged_model_equals_unmerged_and_unmerges_to_base(toy, tokens, randomize):
    base_kernels = {k: np.asarray(v) for k, v in
                    jax.tree_util.tree_flatten_with_path(nnx.state(toy, nnx.Param))[0]}
    inject(toy, "proj", LORA, rngs=nnx.Rngs(1))
    randomize(toy)
    before = toy(tokens)
    merged = merge_adapters(toy)
    assert len(merged) == 12 and merge_adapters(toy) == []
    after = nnx.jit(lambda m, x: m(x))(toy, tokens)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert unmerge_adapters(toy) == merged
    restored = dict(jax.tree_util.tree_flatten_with_path(
        nnx.state(toy, nnx.All(nnx.Param, nnx.Not(AdapterParam))))[0])
    assert restored.keys() == base_kernels.keys()
    for k, v in restored.items():
        np.testing.assert_allclose(v, base_kernels[k], atol=1e-6)


def test_slim_layers_refuse_to_merge(toy):
    inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="layers/0/attn/q_proj"):
        merge_adapters(toy)


def test_token_mask_reaches_every_slim_layer_and_is_cleared(toy, tokens):
    inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(1))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    padded = jnp.where(mask[..., None] > 0, tokens, 1e4)
    reference = nnx.clone(toy)
    with token_mask(toy, mask) as paths:
        assert paths == ["layers/0/attn/q_proj", "layers/1/attn/q_proj"]
        toy(padded)
    assert toy.layers[0].attn.q_proj.token_mask.get_value() is None
    # Padding at 1e4 never became a centre nor widened a variance.
    assert float(jnp.abs(toy.layers[0].attn.q_proj.cluster_mean[...]).max()) < 100
    assert float(toy.layers[0].attn.q_proj.cluster_var[...].max()) < 100
    assert float(reference.layers[0].attn.q_proj.cluster_var[...].max()) == 1.0  # untouched
    with pytest.raises(ConfigError, match="matches no SlimLinear"):
        set_token_mask(toy, mask, pattern="v_proj")


def test_token_mask_inside_a_jitted_grad_step(toy, tokens, randomize):
    inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(1))
    randomize(toy)
    mask = jnp.ones((2, 5))

    @nnx.jit
    def step(model, x, mask):
        def loss(model):
            with token_mask(model, mask):
                return jnp.mean(model(x) ** 2)
        return nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)

    grads = step(toy, tokens, mask)
    assert int(toy.layers[0].attn.q_proj.cluster_count[...]) == 1
    assert toy.layers[0].attn.q_proj.token_mask.get_value() is None
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_l1_penalty_matches_core_and_skips_routers(toy, randomize):
    inject(toy, "q_proj", LORA, rngs=nnx.Rngs(1))
    inject(toy, "up_proj", SLIM, rngs=nnx.Rngs(2))
    randomize(toy)
    ref = 0.0
    for block in toy.layers:
        ref += lora_l1(block.attn.q_proj.lora_a[...], block.attn.q_proj.lora_b[...])
        ref += lora_l1(block.up_proj.experts_a[...], block.up_proj.experts_b[...])
    np.testing.assert_allclose(adapter_l1(toy), ref, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(adapter_l1)(adapter_state(toy)), ref, rtol=1e-6)


def test_optimizer_step_changes_adapters_only(toy_cls, tokens, randomize):
    toy = toy_cls(nnx.Rngs(0), num_layers=1)
    inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(1))
    inject(toy, "up_proj|down_proj", LORA, rngs=nnx.Rngs(2))
    randomize(toy)
    toy(tokens)  # initialise the clusters
    not_adapters = nnx.All(nnx.Param, nnx.Not(AdapterParam))
    frozen = [np.asarray(v) for v in jax.tree.leaves(nnx.state(toy, not_adapters))]
    adapters = [np.asarray(v) for v in jax.tree.leaves(adapter_state(toy))]
    optimizer = nnx.Optimizer(toy, optax.sgd(0.1), wrt=AdapterParam)

    @nnx.jit
    def step(model, optimizer, x):
        def loss(model):
            return jnp.mean(model(x) ** 2) + 0.01 * adapter_l1(model)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)

    step(toy, optimizer, tokens)
    for old, new in zip(frozen, jax.tree.leaves(nnx.state(toy, not_adapters)), strict=True):
        np.testing.assert_array_equal(old, new)
    after = jax.tree.leaves(adapter_state(toy))
    assert all(not np.array_equal(o, n) for o, n in zip(adapters, after, strict=True))
