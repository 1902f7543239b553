"""LoRALinear: exact base behaviour at B = 0, the LoRA formula, merging, dtypes, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.nn import AdapterParam, LoRAConfig, LoRALinear


@pytest.mark.parametrize("use_bias", [True, False])
def test_zero_b_equals_base_exactly(use_bias, tokens):
    base = nnx.Linear(8, 6, use_bias=use_bias, rngs=nnx.Rngs(0))
    layer = LoRALinear.from_linear(base, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    assert layer.kernel is base.kernel
    np.testing.assert_array_equal(layer(tokens), base(tokens))
    assert set(nnx.state(layer, nnx.Param)) == set(nnx.state(base)) | {"lora_a", "lora_b"}


def test_forward_is_base_plus_scaled_low_rank(tokens, randomize):
    layer = LoRALinear(8, 6, LoRAConfig(rank=3, alpha=12), rngs=nnx.Rngs(0))
    randomize(layer)
    w, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    x = np.asarray(tokens)
    ref = x @ w + bias + 4.0 * (x @ a) @ b
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, tokens), ref, rtol=1e-5,
                               atol=1e-6)


def test_merged_forward_equals_unmerged_and_unmerge_restores(tokens, randomize):
    layer = LoRALinear(8, 6, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    randomize(layer)
    kernel = np.asarray(layer.kernel[...])
    before = layer(tokens)
    layer.merge()
    after = layer(tokens)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    assert not np.allclose(layer.kernel[...], kernel)
    layer.unmerge()
    np.testing.assert_allclose(layer.kernel[...], kernel, atol=1e-6)


def test_adapters_stay_fp32_over_a_bf16_base(tokens):
    base = nnx.Linear(8, 6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer = LoRALinear.from_linear(base, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    assert layer.kernel.dtype == jnp.bfloat16 and layer.lora_a.dtype == jnp.float32
    assert layer(tokens).dtype == jnp.bfloat16
    np.testing.assert_array_equal(layer(tokens), base(tokens))


def test_logical_axes_follow_the_base_kernel():
    base = nnx.Linear(8, 6, rngs=nnx.Rngs(0),
                      kernel_metadata={"logical_axes": ("embed", "mlp")})
    layer = LoRALinear.from_linear(base, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    assert layer.lora_a.get_metadata("logical_axes") == ("embed", "lora_rank")
    assert layer.lora_b.get_metadata("logical_axes") == ("lora_rank", "mlp")
    assert isinstance(layer.lora_a, AdapterParam) and isinstance(layer.lora_a, nnx.LoRAParam)


def test_dropout_acts_in_training_only(tokens, randomize):
    layer = LoRALinear(8, 6, LoRAConfig(rank=2, dropout=0.5), rngs=nnx.Rngs(0))
    randomize(layer)
    assert not np.allclose(layer(tokens), layer(tokens))  # fresh masks each call
    layer.eval()
    np.testing.assert_array_equal(layer(tokens), layer(tokens))
    eval_out = layer(tokens)
    layer.dropout.deterministic = True
    np.testing.assert_array_equal(layer(tokens), eval_out)


def test_gradient_reaches_the_adapter_only(tokens, randomize):
    layer = LoRALinear(8, 6, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    randomize(layer)
    grads = nnx.grad(lambda m: jnp.sum(m(tokens) ** 2), argnums=nnx.DiffState(0, AdapterParam))(
        layer)
    assert set(grads) == {"lora_a", "lora_b"}
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
