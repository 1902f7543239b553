"""The shared layers: every attention implementation available here equals a plain reference
(bias, mask, scale, grouped-query heads), in float32 to 1e-5; the KV write and RMS norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.errors import ConfigError, ShapeError
from slim_jax.models.layers import ATTENTION_IMPLS, RMSNorm, attention, write_kv


def _available(impl: str) -> bool:
    return impl != "cudnn" or jax.default_backend() == "gpu"


def _reference(q, k, v, bias, mask, scale):
    """softmax(scale q k^T + bias, masked) v, head by head in float64 NumPy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, s, h, d))
    for head in range(h):
        scores = np.einsum("bsd,btd->bst", q[:, :, head], k[:, :, head // group]) * scale
        if bias is not None:
            scores = scores + np.asarray(bias, np.float64)[:, head]
        if mask is not None:
            scores = np.where(np.asarray(mask), scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bst,btd->bsd", probs, v[:, :, head // group])
    return out.reshape(b, s, h * d)


@pytest.mark.parametrize("impl", [i for i in ATTENTION_IMPLS if _available(i)])
@pytest.mark.parametrize("case", ["gqa_mask_scale", "bias_no_scale", "mha_bias_and_mask"])
def test_every_implementation_equals_the_reference(impl, case):
    keys = jax.random.split(jax.random.key(0), 4)
    heads, kv_heads = (8, 2) if case == "gqa_mask_scale" else (4, 4)
    q = jax.random.normal(keys[0], (2, 5, heads, 16))
    k = jax.random.normal(keys[1], (2, 7, kv_heads, 16))
    v = jax.random.normal(keys[2], (2, 7, kv_heads, 16))
    causal = jnp.arange(7)[None, :] <= jnp.arange(5)[:, None] + 2
    mask = None if case == "bias_no_scale" else jnp.broadcast_to(causal, (2, 5, 7))
    bias = None if case == "gqa_mask_scale" else jax.random.normal(keys[3], (1, heads, 5, 7))
    scale = 16**-0.5 if case == "gqa_mask_scale" else None
    got = jax.jit(lambda q, k, v: attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation=impl))(q, k, v)
    want = _reference(q, k, v, bias, mask, 1.0 if scale is None else scale)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["gqa_mask_scale", "bias_no_scale", "mha_bias_and_mask"])
def test_decoding_forms_of_every_platform_equal_the_reference(case):
    # One query per row: without grouping, CPU and other platforms lower different layouts of
    # the heads (`attention_blocks.one_query`); this CPU runs both by hand.
    from slim_jax.models.attention_blocks import _one_query

    keys = jax.random.split(jax.random.key(1), 4)
    heads, kv_heads = (8, 2) if case == "gqa_mask_scale" else (4, 4)
    q = jax.random.normal(keys[0], (3, 1, heads, 16))
    k, v = (jax.random.normal(key, (3, 9, kv_heads, 16)) for key in keys[1:3])
    mask = (jnp.arange(9)[None, None, :] < jnp.array([9, 4, 1])[:, None, None]
            if case != "bias_no_scale" else None)
    bias = None if case == "gqa_mask_scale" else jax.random.normal(keys[3], (1, heads, 1, 9))
    scale = 16**-0.5 if case == "gqa_mask_scale" else None
    want = _reference(q, k, v, bias, mask, 1.0 if scale is None else scale)
    forms = [(kv_heads, heads // kv_heads)] if heads > kv_heads else [(heads,), (heads, 1)]
    for axes in forms:
        got = _one_query(q, k, v, bias, mask, axes=axes, scale=scale, dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    chosen = jax.jit(lambda q, k, v: attention(q, k, v, bias=bias, mask=mask, scale=scale))
    np.testing.assert_allclose(np.asarray(chosen(q, k, v)), want, atol=1e-5, rtol=1e-5)


def test_unknown_implementation_is_named():
    x = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ConfigError, match="attention implementation 'flash' is not known"):
        attention(x, x, x, implementation="flash")


def test_write_kv_and_rms_norm():
    cache = write_kv(jnp.zeros((2, 6, 1, 3)), jnp.ones((2, 2, 1, 3)), 3)
    assert cache[:, 3:5].min() == 1 and cache.sum() == 2 * 2 * 3
    norm = RMSNorm(4, eps=0.0, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.array([[3.0, -3.0, 3.0, -3.0]])
    np.testing.assert_allclose(norm(x), x / 3)
    t5_style = RMSNorm(4, eps=0.0, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                       scale_in_float32=True)
    assert t5_style(x).dtype == jnp.bfloat16
    assert isinstance(norm.scale, nnx.Param) and norm.scale.logical_axes == ("norm",)


def test_blocked_causal_attention_equals_the_reference_and_its_gradient():
    """`causal=True` (query blocks skipping the future, 3 blocks at s = 130) with padding, GQA and
    a bias equals the float64 reference on every real row, and its gradient the single block's;
    so do the heads-major single block (`causal=False`) and the einsum form (fewer queries)."""
    keys = jax.random.split(jax.random.key(1), 4)
    b, s, heads, kv_heads, d = 2, 130, 4, 2, 8
    q = jax.random.normal(keys[0], (b, s, heads, d))
    k, v = (jax.random.normal(key, (b, s, kv_heads, d)) for key in keys[1:3])
    bias = jax.random.normal(keys[3], (1, heads, s, s))
    segments = jnp.ones((b, s), jnp.int32).at[0, :7].set(0).at[1, 90:].set(2)  # padding, packing
    mask = ((jnp.arange(s)[None, :] <= jnp.arange(s)[:, None])[None]
            & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0))
    real = np.asarray(segments != 0)

    def run(causal, q, k, v):
        return attention(q, k, v, bias=bias, mask=mask, scale=d**-0.5, causal=causal)

    weights = jnp.asarray(real, jnp.float32)[..., None]  # the loss ignores padding rows

    def loss(causal, q, k, v):
        return jnp.sum(run(causal, q, k, v) * weights * jnp.cos(jnp.arange(heads * d)))

    @jax.jit  # one program: the blocked output, and both forms' gradients
    def outputs(q, k, v):
        grad = jax.grad(loss, argnums=(1, 2, 3))
        return (run(True, q, k, v), run(False, q, k, v), grad(True, q, k, v),
                grad(False, q, k, v),
                attention(q[:, :9], k, v, bias=bias[:, :, :9], mask=mask[:, :9]))

    blocked, one_block, blocked_grads, plain_grads, einsum = outputs(q, k, v)
    want = _reference(q, k, v, bias, mask, d**-0.5)
    for got in (blocked, one_block):  # causal blocks; the heads-major single block
        np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5, rtol=1e-5)
    want = _reference(q[:, :9], k, v, bias[:, :, :9], mask[:, :9], 1.0)  # the einsum form
    np.testing.assert_allclose(np.asarray(einsum)[real[:, :9]], want[real[:, :9]], atol=1e-5,
                               rtol=1e-5)
    for blocked, plain in zip(blocked_grads, plain_grads, strict=True):
        np.testing.assert_allclose(blocked, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="causal attention needs as many keys as queries"):
        attention(q[:, :3], k, v, causal=True)


def test_blocked_gradient_equals_the_softmax_forms_including_the_bias():
    """The heads-major core's own gradient (normalised after the products, `custom_vjp`) equals
    autodiff of `jax.nn.dot_product_attention` ("jax") to q, k, v and the bias, causal blocks with
    padding (2 blocks at s = 80) and one bidirectional block with a bias shared by the heads."""
    keys = jax.random.split(jax.random.key(2), 5)
    b, s, heads, kv_heads, d = 2, 80, 4, 2, 8
    q = jax.random.normal(keys[0], (b, s, heads, d))
    k, v = (jax.random.normal(key, (b, s, kv_heads, d)) for key in keys[1:3])
    segments = jnp.ones((b, s), jnp.int32).at[0, :5].set(0)
    mask = ((jnp.arange(s)[None, :] <= jnp.arange(s)[:, None])[None]
            & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0))
    real = jnp.asarray(segments != 0, jnp.float32)[..., None]
    weights = jax.random.normal(keys[3], (b, s, heads * d)) * real
    cases = {"causal": (mask, None, True), "shared bias": (None, jax.random.normal(
        keys[4], (1, 1, s, s)), False)}
    for name, (m, bias, causal) in cases.items():
        def loss(q, k, v, bias, impl, m=m, causal=causal):
            out = attention(q, k, v, bias=bias, mask=m, scale=d**-0.5, implementation=impl,
                            causal=causal and impl == "xla")
            return jnp.sum(out * weights)

        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        got = jax.jit(jax.grad(loss, argnums), static_argnums=4)(q, k, v, bias, "xla")
        want = jax.jit(jax.grad(loss, argnums), static_argnums=4)(q, k, v, bias, "jax")
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)
