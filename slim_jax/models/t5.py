"""T5 v1.1 / FLAN-T5 (and original T5) as a Flax NNX encoder-decoder matching transformers'.

Module names mirror transformers' `T5ForConditionalGeneration`, so a parameter path reads like its
Hugging Face name: `encoder/block/0/layer/0/SelfAttention/q/kernel` is
`encoder.block.0.layer.0.SelfAttention.q.weight` (transposed: kernels are `[d_in, d_out]`), and
PEFT `target_modules` such as `q` and `v` name the same layers. `hf_name_to_path` is the one place
that maps the two.

T5's rules, each kept here:
- relative position buckets (bidirectional in the encoder, causal in the decoder); the bias table
  lives in the first block of each stack and is shared by its later blocks; no other positions;
- no `1/sqrt(d_kv)` scaling of attention scores (transformers folds it into `q`'s initialisation);
- RMS layer norm without mean or bias, computed in float32;
- feed-forward `wo(act(x wi_0) * x wi_1)` (v1.1, gated-GELU) or `wo(relu(x wi))` (original T5);
- original T5 ties the head to the embedding and scales decoder outputs by `d_model**-0.5`;
  v1.1 / FLAN-T5 have their own `lm_head` and no scaling.

The model is deterministic (no dropout): adapters bring their own.

>>> config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
...                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=4,
...                   relative_attention_max_distance=8)
>>> model = T5(config, rngs=nnx.Rngs(0))
>>> model(jnp.ones((2, 5), jnp.int32), jnp.zeros((2, 3), jnp.int32)).shape
(2, 3, 32)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError, ShapeError
from slim_jax.models import hf

# Additive score of a masked key: finite, so that a fully masked (padding) query row stays NaN-free.
_MASKED = -1e30

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and numerics of a T5 model; field names are transformers' `T5Config` names.

    The defaults are google/flan-t5-small's shape.

    Attributes:
      feed_forward_proj: "gated-gelu" (v1.1, FLAN-T5: `wo(gelu_tanh(x wi_0) * x wi_1)`), "relu"
        (original T5: `wo(relu(x wi))`), or "ACT" / "gated-ACT" for ACT in relu, gelu, gelu_new,
        gelu_pytorch_tanh, silu, swish, as transformers reads it.
      tie_word_embeddings: the head is the shared embedding (original T5); else an own `lm_head`.
      scale_decoder_outputs: decoder outputs times `d_model**-0.5` before the head (original T5).
      pad_token_id: padding, also T5's decoder start token; eos_token_id: ends generation.
      dtype: compute dtype (bf16 on accelerators); param_dtype: storage dtype of the parameters.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("T5Config.relative_attention_num_buckets must be >= 4 (exact and "
                              "logarithmic buckets per direction), got "
                              f"{self.relative_attention_num_buckets}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError("T5Config.layer_norm_epsilon must be > 0, got "
                              f"{self.layer_norm_epsilon}")
        _ = self.activation  # validates feed_forward_proj
        for name in ("dtype", "param_dtype"):
            try:
                object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
            except TypeError as err:
                raise ConfigError(f"T5Config.{name} must be a dtype such as 'float32' or "
                                  f"'bfloat16', got {getattr(self, name)!r}") from err

    @property
    def is_gated(self) -> bool:
        """Whether the feed-forward block is gated (`wi_0`, `wi_1`) rather than plain (`wi`)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        """The feed-forward activation, derived from `feed_forward_proj` as transformers does."""
        parts = self.feed_forward_proj.split("-")
        if (len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated")
                or parts[-1] not in _ACTIVATIONS):
            raise ConfigError(f"T5Config.feed_forward_proj {self.feed_forward_proj!r} is not "
                              f"supported; use 'ACT' or 'gated-ACT', ACT in {sorted(_ACTIVATIONS)}")
        # transformers maps "gated-gelu" (only it) to the tanh approximation, as T5 v1.1 trained.
        return _ACTIVATIONS["gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]]

    # Names shared with LlamaConfig, so that generation code can treat both alike.
    @property
    def bos_id(self) -> None:
        """T5 has no BOS token (the decoder starts at `decoder_start_token_id`)."""
        return None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end generation."""
        return (self.eos_token_id,)

    @property
    def pad_id(self) -> int:
        """The padding id."""
        return self.pad_token_id

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides: Any) -> T5Config:
        """The config of a Hugging Face `config.json` dict; `overrides` win (e.g. `dtype=`).

        transformers 5 writes `tie_word_embeddings: true` for every T5 and keeps the real rule in
        `scale_decoder_outputs`; transformers 4 configs say `tie_word_embeddings: false` for v1.1
        models. Both are read; `T5.from_pretrained` also unties a head the checkpoint holds.

        Raises:
          ConfigError: another architecture (model_type other than t5 / mt5), or a bad value.

        >>> c = T5Config.from_hf({"model_type": "t5", "d_model": 16, "num_layers": 2,
        ...                       "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
        >>> (c.d_model, c.num_decoder_layers, c.tie_word_embeddings, c.scale_decoder_outputs)
        (16, 2, False, False)
        """
        model_type = config.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ConfigError(f"model_type {model_type!r} is not a T5; expected 't5' or 'mt5' "
                              "(umt5, longt5 and switch_transformers are other architectures)")
        if "scale_decoder_outputs" in config:  # transformers 5 (its tie_word_embeddings is moot)
            scale = tied = bool(config["scale_decoder_outputs"])
        else:
            scale = tied = config.get("tie_word_embeddings", True) is not False
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        values["num_decoder_layers"] = (config.get("num_decoder_layers")
                                        or config.get("num_layers", cls.num_layers))
        values.update(tie_word_embeddings=tied, scale_decoder_outputs=scale)
        for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if isinstance(values.get(name), list):
                values[name] = values[name][0]
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------------- layers


def _dense(d_in: int, d_out: int, axes: tuple[str, str], config: T5Config, rngs: nnx.Rngs,
           std: float) -> nnx.Linear:
    """A bias-free `nnx.Linear`, kernel `[d_in, d_out]`, T5's init and `logical_axes`."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=config.dtype,
                      param_dtype=config.param_dtype, kernel_init=nnx.initializers.normal(std),
                      rngs=rngs, kernel_metadata={"logical_axes": axes})


class T5LayerNorm(nnx.Module):
    """RMS norm without mean or bias: `y = scale * x / sqrt(mean(x^2) + eps)`, in float32."""

    def __init__(self, config: T5Config):
        self.scale = nnx.Param(jnp.ones((config.d_model,), config.param_dtype),
                               logical_axes=("norm",))
        self.eps = config.layer_norm_epsilon
        self.dtype = config.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_model] -> [..., d_model] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * normed).astype(self.dtype)


class KV(NamedTuple):
    """Keys and values of one attention layer, `[batch, length, heads, d_kv]` each."""

    k: jax.Array
    v: jax.Array


class T5Attention(nnx.Module):
    """Multi-head attention without score scaling; position bias and mask come in as `bias`."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
        d, inner = config.d_model, config.num_heads * config.d_kv
        # transformers' T5 init: q absorbs the 1/sqrt(d_kv) that the attention does not apply.
        self.q = _dense(d, inner, ("embed", "heads"), config, rngs, (d * config.d_kv) ** -0.5)
        self.k = _dense(d, inner, ("embed", "heads"), config, rngs, d**-0.5)
        self.v = _dense(d, inner, ("embed", "heads"), config, rngs, d**-0.5)
        self.o = _dense(inner, d, ("heads", "embed"), config, rngs, inner**-0.5)
        self.relative_attention_bias = nnx.data(None)
        if has_relative_attention_bias:  # only the first block of a stack holds the bias table
            self.relative_attention_bias = nnx.Embed(
                config.relative_attention_num_buckets, config.num_heads,
                param_dtype=config.param_dtype, rngs=rngs,
                embedding_init=nnx.initializers.normal(d**-0.5),
                embedding_metadata={"logical_axes": ("rel_pos", None)})
        self.num_heads, self.d_kv, self.dtype = config.num_heads, config.d_kv, config.dtype

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

    def project_kv(self, source: jax.Array) -> KV:
        """source: [b, s_k, d_model] -> keys and values [b, s_k, heads, d_kv]."""
        return KV(self._split_heads(self.k(source)), self._split_heads(self.v(source)))

    def attend(self, x: jax.Array, kv: KV, bias: jax.Array) -> jax.Array:
        """Queries of x [b, s_q, d] over `kv`, plus `bias` [b or 1, h, s_q, s_k] -> [b, s_q, d]."""
        q = self._split_heads(self.q(x))
        # T5: softmax(q k^T + bias) v, without 1/sqrt(d_kv); scores and softmax in float32.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kv.k.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, kv.v.astype(self.dtype))
        return self.o(out.reshape(*out.shape[:2], -1))

    def __call__(self, x: jax.Array, bias: jax.Array, context: jax.Array | None = None
                 ) -> jax.Array:
        """Self-attention of x [b, s, d], or cross-attention over `context` [b, s_k, d]."""
        return self.attend(x, self.project_kv(x if context is None else context), bias)


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention, optionally through a decoding cache."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, rngs=rngs)
        self.layer_norm = T5LayerNorm(config)

    def __call__(self, x: jax.Array, bias: jax.Array, cache: KV | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
        """x: [b, s, d]; with `cache` ([b, max_len, h, d_kv]) the new keys are written at `index`
        and the queries attend over the whole cache."""
        h = self.layer_norm(x)
        if cache is None:
            return x + self.SelfAttention(h, bias), None
        new = self.SelfAttention.project_kv(h)
        at = (0, index, 0, 0)
        cache = KV(jax.lax.dynamic_update_slice(cache.k, new.k.astype(cache.k.dtype), at),
                   jax.lax.dynamic_update_slice(cache.v, new.v.astype(cache.v.dtype), at))
        return x + self.SelfAttention.attend(h, cache, bias), cache


class T5LayerCrossAttention(nnx.Module):
    """Pre-norm residual attention over the encoder output's keys and values."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, rngs=rngs)
        self.layer_norm = T5LayerNorm(config)

    def __call__(self, x: jax.Array, kv: KV, bias: jax.Array) -> jax.Array:
        """x: [b, s, d]; kv: the encoder's [b, s_enc, h, d_kv]; bias: [b, 1, 1 or s, s_enc]."""
        return x + self.EncDecAttention.attend(self.layer_norm(x), kv, bias)


class T5DenseGatedActDense(nnx.Module):
    """T5 v1.1 feed-forward: `wo(act(x wi_0) * (x wi_1))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.wi_0 = _dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wi_1 = _dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wo = _dense(f, d, ("mlp", "embed"), config, rngs, f**-0.5)
        self.act = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """Original T5 feed-forward: `wo(act(x wi))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.wi = _dense(d, f, ("embed", "mlp"), config, rngs, d**-0.5)
        self.wo = _dense(f, d, ("mlp", "embed"), config, rngs, f**-0.5)
        self.act = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward block."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if config.is_gated else T5DenseActDense
        self.DenseReluDense = dense(config, rngs=rngs)
        self.layer_norm = T5LayerNorm(config)

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

    def __call__(self, x: jax.Array, self_bias: jax.Array, *, cross_kv: KV | None = None,
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


def _attention_mask(q_segments: jax.Array, k_segments: jax.Array, causal: bool) -> jax.Array:
    """Allowed pairs [b, 1, s_q, s_k]: same non-zero segment (packed rows), k <= q if causal."""
    allowed = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        s_q, s_k = q_segments.shape[1], k_segments.shape[1]
        allowed &= jnp.arange(s_k)[None, None, :] <= jnp.arange(s_q)[None, :, None]
    return allowed[:, None]


class T5Stack(nnx.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) stack of blocks."""

    def __init__(self, config: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nnx.List([
            T5Block(config, is_decoder=is_decoder, has_relative_attention_bias=i == 0, rngs=rngs)
            for i in range(n)])
        self.final_layer_norm = T5LayerNorm(config)
        self.is_decoder = is_decoder
        self.max_distance = config.relative_attention_max_distance

    def position_bias(self, query_pos: jax.Array, max_query: int, key_len: int) -> jax.Array:
        """The first block's relative position bias [1, heads, s_q, key_len] for queries at
        `query_pos` [s_q] (all < max_query) over keys 0..key_len-1, shared by every block.

        The buckets of all distances in (-max_query, key_len) are a host constant, looked up by
        `key - query`: a traced decoding position costs no recompilation.
        """
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]
        distances = np.arange(-(max_query - 1), key_len)
        bucket_of = jnp.asarray(relative_position_buckets(
            distances, bidirectional=not self.is_decoder, num_buckets=table.shape[0],
            max_distance=self.max_distance), jnp.int32)
        offset = jnp.arange(key_len)[None, :] - query_pos[:, None] + (max_query - 1)
        values = jnp.take(table.astype(jnp.float32), bucket_of[offset], axis=0)  # [s_q, s_k, h]
        return jnp.transpose(values, (2, 0, 1))[None]

    def cross_kv(self, encoded: jax.Array) -> tuple[KV, ...]:
        """Every decoder block's cross-attention keys and values of `encoded` [b, s_enc, d]."""
        return tuple(b.layer[1].EncDecAttention.project_kv(encoded) for b in self.block)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, *, cross_kv: tuple[KV, ...] = (),
                 cross_bias: jax.Array | None = None) -> jax.Array:
        """Whole sequences, no cache. x: [b, s, d]; segment_ids: [b, s] (0 = padding)."""
        s = x.shape[1]
        bias = self.position_bias(jnp.arange(s), s, s)
        bias = jnp.where(_attention_mask(segment_ids, segment_ids, self.is_decoder), bias, _MASKED)
        for i, block in enumerate(self.block):
            x, _ = block(x, bias, cross_kv=cross_kv[i] if cross_kv else None,
                         cross_bias=cross_bias)
        return self.final_layer_norm(x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class T5DecodeState:
    """What decoding carries between steps, with static shapes (a pytree: jit and loop friendly).

    Attributes:
      self_kv: per decoder block, keys/values of the decoded positions [b, max_length, h, d_kv].
      cross_kv: per decoder block, keys/values of the encoder output [b, s_enc, h, d_kv],
        computed once by `T5.init_decode_state`.
      enc_mask: [b, s_enc] bool, True at real (non-padding) encoder tokens.
      index: [] int32, the position of the next decoder token.
    """

    self_kv: tuple[KV, ...]
    cross_kv: tuple[KV, ...]
    enc_mask: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        """How many decoder positions the cache holds."""
        return self.self_kv[0].k.shape[1]


class T5(nnx.Module):
    """T5 encoder-decoder with transformers' module names (see the module docstring).

    Args:
      config: the model's shape and numerics.
      rngs: initialisation randomness (transformers' T5 initialisation scales).
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                                param_dtype=config.param_dtype, rngs=rngs,
                                embedding_init=nnx.initializers.normal(1.0),
                                embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.encoder = T5Stack(config, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, is_decoder=True, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not config.tie_word_embeddings:
            self.lm_head = _dense(config.d_model, config.vocab_size, ("embed", "vocab"), config,
                                  rngs, 1.0)

    # --------------------------------------------------------------------------------- forward

    def encode(self, enc_tokens: jax.Array, enc_segment_ids: jax.Array | None = None
               ) -> jax.Array:
        """Encoder output [b, s_enc, d_model] of `enc_tokens` [b, s_enc].

        enc_segment_ids: [b, s_enc], 0 marks padding, distinct ids separate packed sequences;
        default: all tokens real, one sequence per row.
        """
        enc_segment_ids = _segments(enc_tokens, enc_segment_ids, "enc")
        return self.encoder(self.shared(enc_tokens), enc_segment_ids)

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder output [b, s, d] -> float32 logits [b, s, vocab]."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5  # original T5 (tied head)
        logits = self.shared.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def __call__(self, enc_tokens: jax.Array, dec_tokens: jax.Array, *,
                 enc_segment_ids: jax.Array | None = None,
                 dec_segment_ids: jax.Array | None = None) -> jax.Array:
        """Teacher-forced float32 logits [b, s_dec, vocab] of `dec_tokens` [b, s_dec] given
        `enc_tokens` [b, s_enc].

        Segment ids [b, s]: 0 marks padding; packed rows number their sequences 1, 2, ... in both,
        and decoder sequence i attends to encoder sequence i. Defaults: all real, one per row.
        """
        enc_segment_ids = _segments(enc_tokens, enc_segment_ids, "enc")
        dec_segment_ids = _segments(dec_tokens, dec_segment_ids, "dec")
        if enc_tokens.shape[0] != dec_tokens.shape[0]:
            raise ShapeError(f"enc_tokens has {enc_tokens.shape[0]} rows, dec_tokens "
                             f"{dec_tokens.shape[0]}: they must have the same batch size")
        encoded = self.encoder(self.shared(enc_tokens), enc_segment_ids)
        cross = _attention_mask(dec_segment_ids, enc_segment_ids, causal=False)
        hidden = self.decoder(self.shared(dec_tokens), dec_segment_ids,
                              cross_kv=self.decoder.cross_kv(encoded),
                              cross_bias=jnp.where(cross, 0.0, _MASKED))
        return self._logits(hidden)

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Logits [b, s_dec, vocab] of an encoder-decoder batch (keys of CONTRIBUTING.md).

        Reads `enc_tokens`, `enc_segment_ids`, `dec_tokens`, `dec_segment_ids`; `targets` and
        `target_mask` are for the loss.
        """
        needed = ("enc_tokens", "enc_segment_ids", "dec_tokens", "dec_segment_ids")
        missing = [k for k in needed if k not in batch]
        if missing:
            raise ShapeError(f"T5.batch_logits needs the encoder-decoder batch keys {needed}; "
                             f"missing {missing} (got {sorted(batch)})")
        return self(batch["enc_tokens"], batch["dec_tokens"],
                    enc_segment_ids=batch["enc_segment_ids"],
                    dec_segment_ids=batch["dec_segment_ids"])

    # -------------------------------------------------------------------------------- decoding

    def init_decode_state(self, encoded: jax.Array, enc_mask: jax.Array, max_length: int
                          ) -> T5DecodeState:
        """An empty cache of `max_length` decoder positions for the encoder output `encoded`
        [b, s_enc, d]; `enc_mask` [b, s_enc] is nonzero at real tokens. The cross-attention keys
        and values are computed here, once for the whole generation.
        """
        if enc_mask.shape != encoded.shape[:2]:
            raise ShapeError(f"enc_mask has shape {enc_mask.shape}; the encoder output needs "
                             f"{encoded.shape[:2]}")
        if max_length < 1:
            raise ShapeError(f"max_length must be >= 1, got {max_length}")
        c = self.config
        empty = jnp.zeros((encoded.shape[0], max_length, c.num_heads, c.d_kv), c.dtype)
        return T5DecodeState(
            self_kv=tuple(KV(empty, empty) for _ in self.decoder.block),
            cross_kv=self.decoder.cross_kv(encoded), enc_mask=enc_mask.astype(bool),
            index=jnp.zeros((), jnp.int32))

    def decode(self, dec_tokens: jax.Array, state: T5DecodeState
               ) -> tuple[jax.Array, T5DecodeState]:
        """Float32 logits [b, s, vocab] of `dec_tokens` [b, s] at positions `state.index` .. + s-1,
        and the state advanced by s.

        All rows share the positions (T5 decoding starts every row at the decoder start token).
        The caller keeps `state.index + s <= state.max_length` (a traced index is not checked).

        >>> cfg = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1,
        ...                num_decoder_layers=1, num_heads=2)
        >>> model = T5(cfg, rngs=nnx.Rngs(0))
        >>> enc, mask = jnp.array([[5, 6, 1]]), jnp.array([[1, 1, 1]])
        >>> state = model.init_decode_state(model.encode(enc, mask), mask, max_length=4)
        >>> logits, state = model.decode(jnp.array([[cfg.decoder_start_token_id]]), state)
        >>> logits.shape, int(state.index)
        ((1, 1, 16), 1)
        """
        b, s = dec_tokens.shape
        max_len = state.max_length
        if b != state.enc_mask.shape[0] or s > max_len:
            raise ShapeError(f"dec_tokens {dec_tokens.shape} do not fit a decode state of "
                             f"{state.enc_mask.shape[0]} rows and {max_len} positions")
        query_pos = state.index + jnp.arange(s)
        bias = self.decoder.position_bias(query_pos, max_len, max_len)
        # k <= q: causal, and hides the cache slots not written yet.
        causal = jnp.arange(max_len)[None, :] <= query_pos[:, None]
        self_bias = jnp.where(causal[None, None], bias, _MASKED)
        cross_bias = jnp.where(state.enc_mask[:, None, None, :], 0.0, _MASKED)
        x = self.shared(dec_tokens)
        caches = []
        for block, cache, kv in zip(self.decoder.block, state.self_kv, state.cross_kv,
                                    strict=True):
            x, cache = block(x, self_bias, cross_kv=kv, cross_bias=cross_bias, cache=cache,
                             index=state.index)
            caches.append(cache)
        logits = self._logits(self.decoder.final_layer_norm(x))
        return logits, dataclasses.replace(state, self_kv=tuple(caches), index=state.index + s)

    # --------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, allow_pickle: bool = False) -> T5:
        """A T5 from a Hugging Face model directory (config.json + safetensors) or hub id.

        The model is built abstractly (`nnx.eval_shape`) and filled from the checkpoint, so no
        random initialisation is spent. The head is untied when the checkpoint holds its own
        `lm_head.weight` (different from `shared.weight`), as transformers decides.

        Args:
          name_or_path: a directory, or a hub id such as `google/flan-t5-large` (online, or in
            the local hub cache).
          dtype: compute dtype; param_dtype: storage dtype the weights are cast to.
          allow_pickle: also accept `pytorch_model.bin` (a pickle can run code: off by default).

        Raises:
          CheckpointError: missing files, pickle weights without `allow_pickle`, tensors that do
            not fit the config (naming the parameter).
          ConfigError: not a T5 config.
        """
        folder = hf.resolve_model_dir(name_or_path)
        config = T5Config.from_hf(hf.read_config(folder), dtype=dtype, param_dtype=param_dtype)
        tensors = hf.load_safetensors(folder, dtype=param_dtype, allow_pickle=allow_pickle)
        config = _tie_as_checkpoint(config, tensors)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        hf.assign_params(model, params_from_hf(tensors, config), source=str(folder))
        return model


def _segments(tokens: jax.Array, segment_ids: jax.Array | None, name: str) -> jax.Array:
    """Check `tokens` is [b, s] and `segment_ids` matches it (default: all ones)."""
    if tokens.ndim != 2:
        raise ShapeError(f"{name}_tokens must be [batch, length], got shape {tokens.shape}")
    if segment_ids is None:
        return jnp.ones(tokens.shape, jnp.int32)
    if segment_ids.shape != tokens.shape:
        raise ShapeError(f"{name}_segment_ids has shape {segment_ids.shape}; it must match "
                         f"{name}_tokens {tokens.shape}")
    return segment_ids


def _tie_as_checkpoint(config: T5Config, tensors: Mapping[str, np.ndarray]) -> T5Config:
    """transformers' rule: untied iff the checkpoint has its own `lm_head` (and the config does
    not tie, or the head differs from the embedding)."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    if head is None:
        tied = True
    elif not config.tie_word_embeddings:
        tied = False
    else:
        tied = shared is not None and np.array_equal(head, shared)
    return dataclasses.replace(config, tie_word_embeddings=tied)


# ------------------------------------------------------------------------ Hugging Face names

_LINEAR_NAMES = frozenset({"q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head"})
_EMBEDDING_NAMES = frozenset({"shared", "relative_attention_bias"})
_NORM_NAMES = frozenset({"layer_norm", "final_layer_norm"})
# Names transformers writes that hold no parameter of their own here: the tied copies of `shared`
# and a cross-attention bias table that old checkpoints carry and no T5 uses.
HF_IGNORED_NAMES = frozenset({
    "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"})


def hf_name_to_path(name: str) -> tuple[str, bool]:
    """Our parameter path of a Hugging Face T5 tensor name, and whether the tensor is transposed.

    The one place that maps Hugging Face T5 names: the module trees are the same, dots become
    "/", and `weight` becomes `kernel` (linear layers, stored `[d_out, d_in]`: transposed),
    `embedding` (`shared`, `relative_attention_bias`) or `scale` (layer norms).

    >>> hf_name_to_path("encoder.block.0.layer.0.SelfAttention.q.weight")
    ('encoder/block/0/layer/0/SelfAttention/q/kernel', True)
    >>> hf_name_to_path("decoder.final_layer_norm.weight")
    ('decoder/final_layer_norm/scale', False)
    """
    *module, leaf = name.split(".")
    owner = module[-1] if module else ""
    transpose = False
    if leaf == "weight" and owner in _LINEAR_NAMES:
        leaf, transpose = "kernel", True
    elif leaf == "weight" and owner in _EMBEDDING_NAMES:
        leaf = "embedding"
    elif leaf == "weight" and owner in _NORM_NAMES:
        leaf = "scale"
    return "/".join([*module, leaf]), transpose


def path_to_hf_name(path: str) -> str:
    """The Hugging Face tensor name of our parameter path (inverse of `hf_name_to_path`).

    >>> path_to_hf_name("decoder/block/1/layer/1/EncDecAttention/v/kernel")
    'decoder.block.1.layer.1.EncDecAttention.v.weight'
    """
    *module, leaf = path.split("/")
    leaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
    return ".".join([*module, leaf])


def params_from_hf(arrays: Mapping[str, np.ndarray], config: T5Config) -> dict[str, np.ndarray]:
    """Hugging Face T5 tensors -> `{our path: array}` in our layout (kernels `[d_in, d_out]`).

    Drops the names in `HF_IGNORED_NAMES`, and `lm_head.weight` when the head is tied; any other
    unknown name is left for `hf.assign_params` to report.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name in HF_IGNORED_NAMES or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        path, transpose = hf_name_to_path(name)
        if transpose and np.ndim(array) != 2:
            raise CheckpointError(f"tensor {name!r} should be a 2-d linear weight, got shape "
                                  f"{np.shape(array)}")
        out[path] = array.T if transpose else array
    return out
