"""The blocks of T5 (transformers' module names): attention without score scaling, relative
position buckets, gated or plain feed-forward, and the encoder / decoder stacks.

>>> relative_position_buckets(np.array([-1, 0, 1]), bidirectional=False, num_buckets=8,
...                           max_distance=16).tolist()
[1, 0, 0]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.models.layers import RMSNorm, attention, linear, remat_layer, write_kv
from slim_jax.models.t5_config import T5Config
from slim_jax.nn.stack import LayerStack

# Additive score of a masked key: finite, so that a fully masked (padding) query row stays NaN-free.
MASKED = -1e30


def dense(d_in: int, d_out: int, axes: tuple[str, str], config: T5Config, rngs: nnx.Rngs,
           std: float) -> nnx.Linear:
    """A bias-free `nnx.Linear`, kernel `[d_in, d_out]`, T5's init and `logical_axes`."""
    return linear(d_in, d_out, axes, dtype=config.dtype, param_dtype=config.param_dtype,
                  std=std, rngs=rngs)


def _norm(config: T5Config) -> RMSNorm:
    """T5's layer norm: RMS without mean or bias, the scale applied in float32."""
    return RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=config.dtype,
                   param_dtype=config.param_dtype, scale_in_float32=True)


class KV(NamedTuple):
    """Keys and values of one attention layer, `[batch, length, heads, d_kv]` each."""

    k: jax.Array
    v: jax.Array


class T5Attention(nnx.Module):
    """Multi-head attention without score scaling; position bias and mask come in as `bias`."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
        d, inner = config.d_model, config.num_heads * config.d_kv
        # transformers' T5 init: q absorbs the 1/sqrt(d_kv) that the attention does not apply.
        self.q = dense(d, inner, ("embed", "heads"), config, rngs, (d * config.d_kv) ** -0.5)
        self.k = dense(d, inner, ("embed", "heads"), config, rngs, d**-0.5)
        self.v = dense(d, inner, ("embed", "heads"), config, rngs, d**-0.5)
        self.o = dense(inner, d, ("heads", "embed"), config, rngs, inner**-0.5)
        self.relative_attention_bias = nnx.data(None)
        if has_relative_attention_bias:  # only the first block of a stack holds the bias table
            self.relative_attention_bias = nnx.Embed(
                config.relative_attention_num_buckets, config.num_heads,
                param_dtype=config.param_dtype, rngs=rngs,
                embedding_init=nnx.initializers.normal(d**-0.5),
                embedding_metadata={"logical_axes": ("rel_pos", None)})
        self.num_heads, self.d_kv, self.dtype = config.num_heads, config.d_kv, config.dtype
        self.implementation = config.attention

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

    def project_kv(self, source: jax.Array) -> KV:
        """source: [b, s_k, d_model] -> keys and values [b, s_k, heads, d_kv]."""
        return KV(self._split_heads(self.k(source)), self._split_heads(self.v(source)))

    def attend(self, x: jax.Array, kv: KV, bias: jax.Array) -> jax.Array:
        """Queries of x [b, s_q, d] over `kv`, plus `bias` [b or 1, h, s_q, s_k] -> [b, s_q, d]."""
        q = self._split_heads(self.q(x))
        # T5: softmax(q k^T + bias) v, without 1/sqrt(d_kv); scores and softmax in float32.
        return self.o(attention(q, kv.k, kv.v, bias=bias, dtype=self.dtype,
                                implementation=self.implementation))

    def __call__(self, x: jax.Array, bias: jax.Array, context: jax.Array | None = None
                 ) -> jax.Array:
        """Self-attention of x [b, s, d], or cross-attention over `context` [b, s_k, d]."""
        return self.attend(x, self.project_kv(x if context is None else context), bias)


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention, optionally through a decoding cache."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, rngs=rngs)
        self.layer_norm = _norm(config)

    def __call__(self, x: jax.Array, bias: jax.Array, cache: KV | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x: [b, s, d]; with `cache` ([b, max_len, h, d_kv]) the new keys are written at `index`
        and the queries attend over the whole cache."""
        h = self.layer_norm(x)
        if cache is None:
            return x + self.SelfAttention(h, bias), None
        new = self.SelfAttention.project_kv(h)
        cache = KV(write_kv(cache.k, new.k, index), write_kv(cache.v, new.v, index))
        return x + self.SelfAttention.attend(h, cache, bias), cache


class T5LayerCrossAttention(nnx.Module):
    """Pre-norm residual attention over the encoder output's keys and values."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, rngs=rngs)
        self.layer_norm = _norm(config)

    def __call__(self, x: jax.Array, kv: KV, bias: jax.Array) -> jax.Array:
        """x: [b, s, d]; kv: the encoder's [b, s_enc, h, d_kv]; bias: [b, 1, 1 or s, s_enc]."""
        return x + self.EncDecAttention.attend(self.layer_norm(x), kv, bias)


class T5DenseGatedActDense(nnx.Module):
    """T5 v1.1 feed-forward: `wo(act(x wi_0) * (x wi_1))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.wi_0 = dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wi_1 = dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wo = dense(f, d, ("mlp", "embed"), config, rngs, f**-0.5)
        self.act = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """Original T5 feed-forward: `wo(act(x wi))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.wi = dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wo = dense(f, d, ("mlp", "embed"), config, rngs, f**-0.5)
        self.act = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward block."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if config.is_gated else T5DenseActDense
        self.DenseReluDense = dense(config, rngs=rngs)
        self.layer_norm = _norm(config)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """`layer` = [self-attention, cross-attention (decoder only), feed-forward], as transformers."""

    def __init__(self, config: T5Config, *, is_decoder: bool, has_relative_attention_bias: bool,
                 rngs: nnx.Rngs):
        layers: list[nnx.Module] = [T5LayerSelfAttention(
            config, has_relative_attention_bias=has_relative_attention_bias, rngs=rngs)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, rngs=rngs))
        layers.append(T5LayerFF(config, rngs=rngs))
        self.layer = nnx.List(layers)

    def __call__(self, x: jax.Array, self_bias: jax.Array, cross_kv: KV | None = None,
                 cross_bias: jax.Array | None = None, cache: KV | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x: [b, s, d] -> ([b, s, d], the updated self-attention cache or None)."""
        x, cache = self.layer[0](x, self_bias, cache, index)
        if cross_kv is not None:
            x = self.layer[1](x, cross_kv, cross_bias)
        return self.layer[-1](x), cache


# --------------------------------------------------------------------- relative position bias


def relative_position_buckets(relative_position: np.ndarray, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bucket of each `relative_position = key_pos - query_pos` (Mesh TensorFlow's rule).

    Half the buckets (per direction when bidirectional) hold the exact distances n < max_exact,
    the rest logarithmic bins up to `max_distance`, beyond which all share the last bucket:
    bucket(n) = max_exact + floor(log(n / max_exact) / log(max_distance / max_exact)
    * (num_buckets - max_exact)). Causal (decoder) buckets count past distances only. Computed in
    NumPy float32 on the host, which reproduces transformers' buckets exactly.

    >>> relative_position_buckets(np.array([-3, 0, 1, 200]), bidirectional=True, num_buckets=32,
    ...                           max_distance=128).tolist()
    [3, 0, 17, 31]
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    log_ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, causal: bool) -> jax.Array:
    """Allowed pairs [b, 1, s_q, s_k]: same non-zero segment (packed rows), k <= q if causal."""
    allowed = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        s_q, s_k = q_segments.shape[1], k_segments.shape[1]
        allowed &= jnp.arange(s_k)[None, None, :] <= jnp.arange(s_q)[None, :, None]
    return allowed[:, None]


Caches = tuple[KV, ...] | KV
"""Per-block keys/values of a stack: a tuple of one `KV` per block (unrolled), or one `KV` whose
arrays carry a leading `[num_layers]` axis (`T5Config.scan_layers`)."""


class T5Stack(nnx.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) stack of blocks.

    Unrolled, `block` is an `nnx.List` and block 0 holds the relative position bias table (paths
    as transformers'); with `T5Config.scan_layers`, `block` is a `LayerStack` (every block alike,
    applied in one `jax.lax.scan`) and the table, taken out of block 0, is the stack's own
    `relative_attention_bias`: the bias is computed once, outside the scanned body, and shared
    by every block as before.
    """

    def __init__(self, config: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        n = config.num_decoder_layers if is_decoder else config.num_layers
        # Built one by one either way, so a scanned stack starts from the unrolled one's weights.
        blocks = [T5Block(config, is_decoder=is_decoder, has_relative_attention_bias=i == 0,
                          rngs=rngs) for i in range(n)]
        self.relative_attention_bias = nnx.data(None)
        if config.scan_layers:  # block 0 gives up its table, so that every block is alike
            first = blocks[0].layer[0].SelfAttention
            self.relative_attention_bias = first.relative_attention_bias
            first.relative_attention_bias = nnx.data(None)
            self.block: LayerStack | nnx.List = LayerStack(blocks)
        else:
            self.block = nnx.List(blocks)
        self.final_layer_norm = _norm(config)
        self.is_decoder = is_decoder
        self.max_distance = config.relative_attention_max_distance
        self.remat = config.remat

    @property
    def scanned(self) -> bool:
        """Whether the blocks are stacked (`T5Config.scan_layers`)."""
        return isinstance(self.block, LayerStack)

    def position_bias(self, query_pos: jax.Array, max_query: int, key_len: int) -> jax.Array:
        """The relative position bias [1, heads, s_q, key_len] for queries at `query_pos` [s_q]
        (all < max_query) over keys 0..key_len-1, shared by every block.

        The buckets of all distances in (-max_query, key_len) are a host constant, looked up by
        `key - query`: a traced decoding position costs no recompilation.
        """
        owner = (self if self.scanned
                 else self.block[0].layer[0].SelfAttention)  # type: ignore[index]
        table = owner.relative_attention_bias.embedding[...]
        distances = np.arange(-(max_query - 1), key_len)
        bucket_of = jnp.asarray(relative_position_buckets(
            distances, bidirectional=not self.is_decoder, num_buckets=table.shape[0],
            max_distance=self.max_distance), jnp.int32)
        offset = jnp.arange(key_len)[None, :] - query_pos[:, None] + (max_query - 1)
        values = jnp.take(table.astype(jnp.float32), bucket_of[offset], axis=0)  # [s_q, s_k, h]
        return jnp.transpose(values, (2, 0, 1))[None]

    def cross_kv(self, encoded: jax.Array) -> Caches:
        """Every decoder block's cross-attention keys and values of `encoded` [b, s_enc, d]
        (`Caches`: stacked when scanned)."""
        def project(block: T5Block) -> KV:
            return block.layer[1].EncDecAttention.project_kv(encoded)

        if self.scanned:
            return self.block.scan(lambda block, carry, _: (carry, project(block)), None)[1]
        return tuple(project(block) for block in self.block)

    def run(self, x: jax.Array, self_bias: jax.Array, *, cross_kv: Caches | None = None,
            cross_bias: jax.Array | None = None, caches: Caches | None = None,
            index: jax.Array | None = None, remat: str = "none"
            ) -> tuple[jax.Array, Caches | None]:
        """The blocks in order over x [b, s, d]: `(x, updated caches or None)`.

        `self_bias` (position bias and mask) and `cross_bias` are shared by every block;
        `cross_kv` and `caches` hold one entry per block (`Caches`, stacked when scanned: then
        the blocks run as one `jax.lax.scan`). `remat` rematerialises each block
        (`layers.remat_layer`; inside the scanned body).
        """
        call = remat_layer(remat)
        if self.scanned:  # one block body in a jax.lax.scan over the stacked blocks
            return self.block.scan(
                lambda block, x, kv: call(block, x, self_bias, kv[0], cross_bias, kv[1], index),
                x, (cross_kv, caches))
        updated = []
        for i, block in enumerate(self.block):
            x, cache = call(block, x, self_bias, None if cross_kv is None else cross_kv[i],
                            cross_bias, None if caches is None else caches[i], index)
            updated.append(cache)
        return x, None if caches is None else tuple(updated)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, *, cross_kv: Caches | None = None,
                 cross_bias: jax.Array | None = None) -> jax.Array:
        """Whole sequences, no cache. x: [b, s, d]; segment_ids: [b, s] (0 = padding)."""
        s = x.shape[1]
        bias = self.position_bias(jnp.arange(s), s, s)
        bias = jnp.where(attention_mask(segment_ids, segment_ids, self.is_decoder), bias, MASKED)
        # T5Config.remat: recompute activations in the backward
        x, _ = self.run(x, bias, cross_kv=cross_kv, cross_bias=cross_bias, remat=self.remat)
        return self.final_layer_norm(x)
