"""The pieces every model family shares: RMS norm, the linear factory, rotary embeddings, the
attention core and the KV-cache write.

A family file keeps only what is its own (block layout, position scheme, decode state); anything
two families compute alike lives here once.

>>> q = jnp.ones((1, 3, 4, 8)); k = v = jnp.ones((1, 5, 2, 8))  # 4 query heads over 2 kv heads
>>> attention(q, k, v, mask=jnp.ones((1, 3, 5), bool)).shape
(1, 3, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import ConfigError, ShapeError
from slim_jax.models.attention_blocks import (
    bias_and_mask,
    causal_block,
    heads_major,
    one_query,
    per_head_bias,
)

AttentionImpl = Literal["xla", "jax", "cudnn"]
ATTENTION_IMPLS: tuple[str, ...] = ("xla", "jax", "cudnn")
"""`attention` implementations: "xla" is the einsum form (the default: on CPU it is at least as
fast as `jax.nn.dot_product_attention`), over whole sequences by query blocks that skip the masked
future for causal self-attention, and for one query per row (decoding) as products over the
cache's own layout (`slim_jax.models.attention_blocks`); "jax" is `jax.nn.dot_product_attention`
with XLA's implementation; "cudnn" is its cuDNN fused (flash) kernel, GPU only."""


REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots_saveable", "nothing_saveable",
                                   "dots_with_no_batch_dims_saveable", "everything_saveable")
"""Activation rematerialisation of each decoder / encoder layer: "none" keeps every activation
for the backward pass; "full" recomputes the whole layer (saves only its inputs); the others are
`jax.checkpoint_policies` of what to keep (e.g. "dots_saveable": matmul outputs kept, the rest
recomputed)."""


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a `ConfigError` naming `what` and the choices.

    >>> check_choice("remat policy", "dots_saveable", REMAT_POLICIES)
    'dots_saveable'
    """
    if value not in choices:
        raise ConfigError(f"{what} {value!r} is not known; expected one of {', '.join(choices)}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecutionConfig:
    """How a model runs rather than what it computes; every family's config extends it.

    Attributes:
      attention: the attention implementation (`ATTENTION_IMPLS`).
      remat: activation rematerialisation of each layer in the forward pass (`REMAT_POLICIES`).
    """

    attention: str = "xla"
    remat: str = "none"

    def __post_init__(self) -> None:
        check_choice("attention implementation", self.attention, ATTENTION_IMPLS)
        check_choice("remat policy", self.remat, REMAT_POLICIES)


def remat_layer(policy: str) -> Callable[..., Any]:
    """`call(layer, *args) -> layer(*args)`, rematerialised by `policy` (`REMAT_POLICIES`) with
    `jax.checkpoint`; "none" calls the layer as it is.

    >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0)); x = jnp.ones((1, 2))
    >>> bool((remat_layer("full")(layer, x) == layer(x)).all())
    True
    """
    check_choice("remat policy", policy, REMAT_POLICIES)
    if policy == "none":
        return lambda layer, *args: layer(*args)
    saveable = None if policy == "full" else getattr(jax.checkpoint_policies, policy)

    def call(layer: nnx.Module, *args: Any) -> Any:
        # A pure function of the layer's state under jax.checkpoint, the state a call may change
        # (SLIM statistics, RNG counts: everything but parameters) written back: works however
        # the caller traces the model (nnx transforms, or jax.grad over `nnx.merge` as the train
        # step does). Parameters are not written back: a call never changes them, and a model
        # built in an outer trace (LoRAHub composes it per candidate, then maps over batches)
        # may not be written from an inner one.
        graphdef, state = nnx.split(layer)

        def pure(state: nnx.State, *args: Any) -> tuple[Any, nnx.State]:
            module = nnx.merge(graphdef, state)
            return module(*args), nnx.state(module, nnx.Not(nnx.Param))

        out, changed = jax.checkpoint(pure, policy=saveable)(state, *args)
        nnx.update(layer, changed)
        return out

    return call


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32; no mean, no bias.

    `scale_in_float32`: multiply by the scale in float32 and cast once (T5, as transformers'
    T5LayerNorm), instead of casting the normalised x and the scale to `dtype` first (Llama).
    """

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any,
                 scale_in_float32: bool = False):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype
        self.scale_in_float32 = scale_in_float32

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in `dtype`."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale_in_float32:
            return (self.scale[...].astype(jnp.float32) * normed).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, bias: bool = False,
           dtype: Any, param_dtype: Any, std: float = 0.02, rngs: nnx.Rngs) -> nnx.Linear:
    """An `nnx.Linear` with kernel `[d_in, d_out]` ~ N(0, std^2) carrying `logical_axes`.

    >>> linear(4, 8, ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32,
    ...        rngs=nnx.Rngs(0)).kernel.logical_axes
    ('embed', 'mlp')
    """
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs,
                      kernel_metadata={"logical_axes": axes},
                      bias_metadata={"logical_axes": axes[1:]})


# ------------------------------------------------------------------------------ rotary embeddings


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts longer than pretraining (transformers' `rope_type`).

    Attributes:
      kind: "linear" (every frequency divided by `factor`) or "llama3" (low frequencies divided by
        `factor`, high ones kept, a smooth blend between; Llama 3.1).
      factor: the context extension factor.
      low_freq_factor, high_freq_factor, original_max_position_embeddings: llama3's band edges:
        wavelengths above `original / low_freq_factor` are scaled, below `original /
        high_freq_factor` kept.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ConfigError(f"rope scaling kind {self.kind!r} is not supported; "
                              "expected 'linear' or 'llama3' (or no scaling)")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, "
                              f"got {self.high_freq_factor} and {self.low_freq_factor}")


@functools.lru_cache(maxsize=32)
def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]` float32, as transformers computes them.

    inv_freq_i = 1 / theta^(2i / head_dim); "linear" divides all by `factor`; "llama3" divides
    those with wavelength 2 pi / inv_freq above `original / low_freq_factor`, keeps those below
    `original / high_freq_factor` and blends linearly in between (Llama 3.1's scaling).

    >>> rope_frequencies(4, 10000.0, None).tolist()
    [1.0, 0.009999999776482582]
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    original = scaling.original_max_position_embeddings
    low_wavelen = original / scaling.low_freq_factor
    high_wavelen = original / scaling.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((original / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`cos, sin: [b, s, head_dim // 2]` float32 of `positions [b, s]`: one angle per frequency,
    computed once per forward and shared by every layer's `apply_rope`.

    >>> cos, sin = rope_cos_sin(jnp.zeros((2, 3), jnp.int32), rope_frequencies(4, 1e4, None))
    >>> [a.shape for a in (cos, sin)]
    [(2, 3, 2), (2, 3, 2)]
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x: [b, s, ..., head_dim]` by position (rotate-half convention, as transformers).

    rope(x) = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1], i.e. per half
    [x1 cos - x2 sin, x2 cos + x1 sin] with the half tables `cos, sin: [b, s, head_dim // 2]`
    float32 (one elementwise pass, no full-width tables or negated copy). Computed in float32,
    returned in `x.dtype`.

    >>> cos, sin = rope_cos_sin(jnp.ones((1, 1), jnp.int32), np.array([np.pi / 2], np.float32))
    >>> apply_rope(jnp.array([[[1.0, 2.0]]]), cos, sin).round(5).tolist()  # a quarter turn
    [[[-2.0, 1.0]]]
    """
    extra = (1,) * (x.ndim - 3)
    cos = cos.reshape(*cos.shape[:2], *extra, cos.shape[-1])
    sin = sin.reshape(*sin.shape[:2], *extra, sin.shape[-1])
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---------------------------------------------------------------------------------- attention


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    dtype: Any = None,
    implementation: AttentionImpl = "xla",
    causal: bool = False,
) -> jax.Array:
    """softmax(scale * q k^T + bias, masked) v over grouped-query heads; scores in float32.

    Args:
      q: `[b, s, heads, d]` queries; k, v: `[b, t, kv_heads, d]`, `heads` a multiple of
        `kv_heads` (query head h reads kv head h // (heads // kv_heads)).
      bias: added to the scores, `[b or 1, heads or 1, s or 1, t]` (T5's relative position bias
        and masks).
      mask: `[b, s, t]` bool, True where a query may attend; masked scores get float32's minimum.
      scale: multiplies the scores; None means none (T5); Llama passes `d**-0.5`.
      dtype: the dtype of the probabilities and output (default `q.dtype`).
      implementation: "xla" (the einsum forms below), "jax" or "cudnn"
        (`jax.nn.dot_product_attention`).
      causal: the caller's promise that `s == t`, query i sits at key slot i and the `mask` /
        `bias` already forbid every key j > i (self-attention without a cache). "xla" then
        computes by query blocks that skip the key blocks above the diagonal
        (`attention_blocks.heads_major`); the result is the same. A row with no visible key at
        all (padding) gets a meaningless output either way.

    Returns:
      `[b, s, heads * d]` in `dtype`.

    >>> q, k = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 3, 1, 4))
    >>> v = jnp.arange(12.0).reshape(1, 3, 1, 4)
    >>> mask = jnp.array([[[1, 0, 0], [1, 1, 1]]], bool)
    >>> attention(q, k, v, mask=mask)[0, :, :4].tolist()  # row 0 sees key 0, row 1 averages all
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    dtype = q.dtype if dtype is None else dtype
    if implementation != "xla":
        check_choice("attention implementation", implementation, ATTENTION_IMPLS)
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), bias=bias,
            mask=None if mask is None else mask[:, None], scale=1.0 if scale is None else scale,
            implementation="xla" if implementation == "jax" else implementation)
        return out.astype(dtype).reshape(b, s, heads * d)
    if causal and k.shape[1] != s:
        raise ShapeError(f"causal attention needs as many keys as queries; got {s} queries "
                         f"and {k.shape[1]} keys (a cache is not causal self-attention)")
    if k.shape[1] == s and s > 1:  # self-attention over whole sequences (no cache): heads-major
        return heads_major(q, k, v, bias, mask, scale, dtype,
                           block=causal_block(s) if causal else s)
    if s == 1:  # one new token per row over a cache or an encoder output (decoding)
        return one_query(q, k, v, bias, mask, scale, dtype)
    groups = heads // kv_heads
    q = q.reshape(b, s, kv_heads, groups, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = bias_and_mask(scores, None if bias is None else per_head_bias(bias, kv_heads, groups),
                           mask, scale)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(dtype))
    return out.reshape(b, s, heads * d)


def write_kv(cache: jax.Array, new: jax.Array, start: jax.Array | int) -> jax.Array:
    """`cache [b, max_len, kv_heads, d]` with `new [b, s, kv_heads, d]` written at slot `start`.

    >>> write_kv(jnp.zeros((1, 4, 1, 1)), jnp.ones((1, 2, 1, 1)), 1)[0, :, 0, 0].tolist()
    [0.0, 1.0, 1.0, 0.0]
    """
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, start, 0, 0))
