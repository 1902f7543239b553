"""The attention cores behind `slim_jax.models.layers.attention` ("xla" implementation): the
forms XLA's CPU backend runs fastest, each with the result of the plain einsum form
(softmax(scale q k^T + bias, masked) v, scores in float32).

- `heads_major`: self-attention over whole sequences (no cache), heads-major, by query blocks
  that skip the masked future when causal; softmax normalised after the products, with its own
  gradient (`_blocks`, a `jax.custom_vjp`).
- `one_query`: one query per row (a decoding step) over keys in their cache layout.

Shapes: q `[b, s, heads, d]`, k / v `[b, t, kv_heads, d]` (query head h reads kv head
h // (heads // kv_heads)), bias `[b|1, heads|1, s|1, t]`, mask `[b, s, t]` (True = may attend);
every function returns `[b, s, heads * d]` in `dtype`.

>>> q = jnp.ones((1, 130, 4, 8)); k = v = jnp.ones((1, 130, 2, 8))
>>> heads_major(q, k, v, None, None, 8**-0.5, jnp.float32, block=64).shape
(1, 130, 32)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)  # a masked score


def causal_block(s: int) -> int:
    """The query block of causal `heads_major` for `s` tokens: 64, or more so that there are at
    most 16 blocks (each block is its own einsums: the program grows with their number).

    >>> causal_block(256), causal_block(4096)
    (64, 256)
    """
    return max(64, -(-s // 16))


def bias_and_mask(scores: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
                  scale: float | None) -> jax.Array:
    """`scale * scores + bias`, masked to float32's minimum; scores `[b, kv, g, s, t]`, bias
    `[b|1, kv|1, g|1, s|1, t]` (`per_head_bias`) and mask `[b, s, t]` cut to the same s, t."""
    if scale is not None:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, NEG)
    return scores


def per_head_bias(bias: jax.Array, kv_heads: int, groups: int) -> jax.Array:
    """Bias `[b|1, heads|1, s|1, t]` -> `[b|1, kv|1, g|1, s|1, t]`, the scores' head axes."""
    per_head = (kv_heads, groups) if bias.shape[1] == kv_heads * groups else (1, 1)
    return bias.reshape(bias.shape[0], *per_head, *bias.shape[2:])


def heads_major(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
                mask: jax.Array | None, scale: float | None, dtype: Any, *, block: int
                ) -> jax.Array:
    """Self-attention (`t == s`) in the heads-major layout, by query blocks of `block`.

    With `block < s` the attention must be causal: the block of queries `[i, j)` attends to keys
    `[0, j)` only, since every later key is masked for all of them; this skips about half the
    score and softmax work, and each block's scores stay small enough for the cache (on CPU
    1.5-3x the single einsum's forward, see benchmarks/attention_forms.py). `block == s` is one
    block over all keys (bidirectional, e.g. T5's encoder)."""
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # heads-major [b, kv, g, s, d] / [b, kv, t, d]: each block's products are plain batched matmuls
    qh = q.reshape(b, s, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    kh = k.astype(q.dtype).transpose(0, 2, 1, 3)
    vh = v.astype(dtype).transpose(0, 2, 1, 3)
    bias = None if bias is None else per_head_bias(bias, kv_heads, groups)
    out = _blocks(qh, kh, vh, bias, mask, scale, jnp.dtype(dtype), block)  # [b, kv, g, s, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, heads * d)


def _spans(s: int, block: int) -> list[tuple[int, int]]:
    """The query blocks `[start, end)`; block i attends to keys `[0, end)`."""
    return [(start, min(start + block, s)) for start in range(0, s, block)]


def _cut(x: jax.Array | None, start: int, end: int, s: int) -> jax.Array | None:
    """Bias `[.., s|1, t]` or mask `[b, s, t]` cut to queries `[start, end)`, keys `[0, end)`."""
    if x is None:
        return None
    return x[..., start:end, :end] if x.shape[-2] == s else x[..., :end]


def _forward(qh, kh, vh, bias, mask, scale, dtype, block):
    """Per block: e = exp(scores - rowmax), l = sum e, out = (e v) / l. Dividing the `[s, d]`
    product rather than the `[s, t]` probabilities saves a pass over the scores (the forward of
    the softmax form, 1.1x at the model's shapes). Returns out and, per block, (e, l)."""
    s = qh.shape[3]
    outs, saved = [], []
    for start, end in _spans(s, block):
        scores = jnp.einsum("bkgsd,bktd->bkgst", qh[:, :, :, start:end], kh[:, :, :end],
                            preferred_element_type=jnp.float32)
        scores = bias_and_mask(scores, _cut(bias, start, end, s), _cut(mask, start, end, s),
                               scale)
        e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        total = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum("bkgst,bktd->bkgsd", e.astype(dtype), vh[:, :, :end],
                         preferred_element_type=jnp.float32) / total
        outs.append(out.astype(dtype))
        saved.append((e, total))
    return (jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocks(qh, kh, vh, bias, mask, scale, dtype, block):
    """`heads_major`'s core on `qh [b, kv, g, s, d]`, `kh, vh [b, kv, t, d]`, bias
    `[b|1, kv|1, g|1, s|1, t]` -> `[b, kv, g, s, d]`; its gradient is the softmax form's."""
    return _forward(qh, kh, vh, bias, mask, scale, dtype, block)[0]


def _blocks_fwd(qh, kh, vh, bias, mask, scale, dtype, block):
    out, saved = _forward(qh, kh, vh, bias, mask, scale, dtype, block)
    return out, (qh, kh, vh, bias, mask, out, saved)


def _blocks_bwd(scale, dtype, block, residuals, d_out):
    """The softmax form's gradient, block by block: p = e / l, dv += p^T dO, dp = dO v^T,
    ds = p (dp - rowsum(dO * O)) (masked entries 0; rowsum(p dp) = rowsum(dO O) saves a pass
    over the scores), dbias = ds, dq = scale ds k, dk += scale ds^T q."""
    qh, kh, vh, bias, mask, out, saved = residuals
    s = qh.shape[3]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                    keepdims=True)  # [b, kv, g, s, 1]
    dq = []
    dk = jnp.zeros(kh.shape, jnp.float32)
    dv = jnp.zeros(vh.shape, jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    for (start, end), (e, total) in zip(_spans(s, block), saved, strict=True):
        p = e / total
        d_o = d_out[:, :, :, start:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("bkgst,bkgsd->bktd", p.astype(dtype), d_o,
                                              preferred_element_type=jnp.float32))
        dp = jnp.einsum("bkgsd,bktd->bkgst", d_o, vh[:, :, :end],
                        preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, :, :, start:end])
        block_mask = _cut(mask, start, end, s)
        if block_mask is not None:
            ds = jnp.where(block_mask[:, None, None], ds, 0.0)
        if dbias is not None:
            summed = tuple(i for i in range(3) if bias.shape[i] == 1)
            part = jnp.sum(ds, axis=summed, keepdims=True)
            if bias.shape[3] == 1:
                dbias = dbias.at[..., :end].add(jnp.sum(part, axis=3, keepdims=True))
            else:
                dbias = dbias.at[..., start:end, :end].add(part)
        if scale is not None:
            ds = ds * scale
        dq.append(jnp.einsum("bkgst,bktd->bkgsd", ds, kh[:, :, :end]))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgst,bkgsd->bktd", ds, qh[:, :, :, start:end]))
    dq_all = jnp.concatenate(dq, axis=3) if len(dq) > 1 else dq[0]
    return (dq_all.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype),
            None if bias is None else dbias.astype(bias.dtype), None)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def one_query(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
              mask: jax.Array | None, scale: float | None, dtype: Any) -> jax.Array:
    """Attention of one query per row (`s == 1`, a decoding step) over keys in their own
    `[b, t, kv_heads, d]` layout, as products and sums rather than batched matmuls: a matmul
    would need the keys and values heads-major, i.e. a transposed copy of the whole cache (or of
    the encoder's keys) per layer and per token, which costs more than the products themselves
    (one query row is a matrix-vector product).

    scores[b, t, k, g] = sum_d q[b, k, g, d] key[b, t, k, d] (float32); out = sum_t p v.

    Without grouping (`heads == kv_heads`, e.g. T5) the best form depends on the compiler, so
    it is chosen per platform as the program is lowered (`jax.lax.platform_dependent`): on CPU
    the group axis is left out (kept at size 1, XLA's CPU compiler fused the products and sums
    into the output projection's matmul and ran them 10-17x slower: T5 decoding, 4 rows x 256
    keys x 8 heads); elsewhere it is kept at size 1 (left out, XLA's TPU compiler needed 17.4
    instead of 9.2 GiB of temporaries for FLAN-T5-large's greedy decoding of 16 x 2048-token
    prompts on a v5e chip: `benchmarks/POD.md`).
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    groups = heads // kv_heads
    form = functools.partial(_one_query, scale=scale, dtype=dtype)
    if groups > 1:
        return form(q, k, v, bias, mask, axes=(kv_heads, groups))
    return jax.lax.platform_dependent(q, k, v, bias, mask,
                                      cpu=functools.partial(form, axes=(heads,)),
                                      default=functools.partial(form, axes=(heads, 1)))


def _one_query(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
               mask: jax.Array | None, *, axes: tuple[int, ...], scale: float | None,
               dtype: Any) -> jax.Array:
    """`one_query` with the query heads laid out as `axes`: `(kv_heads, groups)` or, without
    grouping, `(heads,)` or `(heads, 1)`; keys and values get a size-1 axis for each extra one."""
    b, _, heads, d = q.shape
    per_kv = (slice(None),) * 3 + (None,) * (len(axes) - 1)  # keys / values: [b, t, kv(, 1), d]
    qg = q.reshape(b, 1, *axes, d).astype(jnp.float32)
    scores = jnp.sum(qg * k.astype(jnp.float32)[per_kv], axis=-1)  # [b, t, *axes]
    if scale is not None:
        scores = scores * scale
    if bias is not None:  # [b|1, heads|1, 1, t] -> [b|1, t, *axes or 1s]
        per_head = axes if bias.shape[1] == heads else (1,) * len(axes)
        scores = scores + jnp.moveaxis(bias[:, :, 0], 1, 2).reshape(
            bias.shape[0], bias.shape[3], *per_head)
    if mask is not None:  # [b, 1, t]
        scores = jnp.where(mask[:, 0][(..., *(None,) * len(axes))], scores, NEG)
    probs = jax.nn.softmax(scores, axis=1).astype(dtype).astype(jnp.float32)
    values = v.astype(dtype).astype(jnp.float32)[per_kv]
    out = jnp.sum(probs[..., None] * values, axis=1)  # [b, *axes, d]
    return out.astype(dtype).reshape(b, 1, heads * d)
