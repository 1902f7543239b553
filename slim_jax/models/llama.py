"""The Llama-family decoder (Llama 2/3, Qwen2-style q/k/v bias) in Flax NNX, matching transformers.

Module names follow Hugging Face's, so parameter paths read `layers/0/self_attn/q_proj/kernel`,
`layers/0/mlp/gate_proj/kernel`, ... and adapter `inject` / PEFT `target_modules` match the same
layers. Linear kernels are `[d_in, d_out]`; every parameter carries `logical_axes` metadata.

One block (pre-norm):
    h   = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

Attention masks come from `segment_ids` (0 = padding; tokens attend only within their own segment,
so packed sequences work) and slot order (causal). Decoding uses an explicit `KVCache` of static
shape, so a whole generation compiles once.

>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
...                   num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 5), jnp.int32)).shape
(2, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError, ShapeError
from slim_jax.models.hf import (
    assign_params,
    load_safetensors,
    read_config,
    read_eos_ids,
    resolve_model_dir,
)

HF_MODEL_TYPES = ("llama", "qwen2")


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


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family decoder.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers: sizes (hidden = d_model,
        intermediate = SwiGLU hidden).
      num_heads, num_kv_heads: query and key/value heads (grouped-query attention when fewer kv).
      head_dim: per-head size; None means `hidden_size // num_heads`.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base; rope_scaling: optional `RopeScaling`.
      max_position_embeddings: the longest context the checkpoint was configured for.
      tie_word_embeddings: logits use the embedding matrix (no `lm_head`).
      qkv_bias, o_bias, mlp_bias: biases (Llama: `attention_bias` sets q/k/v/o; Qwen2: q/k/v only).
      bos_id, eos_ids, pad_id: special token ids from the checkpoint's config (eos may be several).
      dtype: compute dtype; param_dtype: parameter dtype (both fp32 by default).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                                  f"num_heads ({self.num_heads}); give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                param_dtype: Any = jnp.float32) -> LlamaConfig:
        """The config of a Hugging Face `config.json` (model_type "llama" or "qwen2").

        Reads both the transformers 5 `rope_parameters` and the older `rope_theta` + `rope_scaling`.

        Raises:
          ConfigError: another architecture, activation, RoPE type, or active sliding window.

        >>> LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
        ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}).head_dim
        4
        """
        kind = config.get("model_type")
        if kind not in HF_MODEL_TYPES:
            raise ConfigError(f"model_type {kind!r} is not a Llama-family decoder; expected one of "
                              f"{', '.join(HF_MODEL_TYPES)}")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported; "
                              "expected 'silu'")
        if config.get("use_sliding_window") or (kind != "qwen2" and config.get("sliding_window")):
            raise ConfigError("sliding-window attention is not supported (use_sliding_window / "
                              "sliding_window must be off)")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
        scaling = None
        if rope_type in ("linear", "llama3"):
            original = rope.get("original_max_position_embeddings",
                                config.get("max_position_embeddings", 2048))
            scaling = RopeScaling(kind=rope_type, factor=float(rope["factor"]),
                                  low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                                  high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                                  original_max_position_embeddings=int(original))
        elif rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported; expected 'default', "
                              "'linear' or 'llama3'")
        heads = config["num_attention_heads"]
        attention_bias = bool(config.get("attention_bias", False))
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or None,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            bos_id=config.get("bos_token_id"),
            eos_ids=eos_ids,
            pad_id=config.get("pad_token_id"),
            dtype=dtype,
            param_dtype=param_dtype,
        )


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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x: [b, s, ..., head_dim]` by position (rotate-half convention, as transformers).

    rope(x) = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1];
    `cos, sin: [b, s, head_dim]` float32. Computed in float32, returned in `x.dtype`.
    """
    extra = (1,) * (x.ndim - 3)
    cos = cos.reshape(*cos.shape[:2], *extra, cos.shape[-1])
    sin = sin.reshape(*sin.shape[:2], *extra, sin.shape[-1])
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for incremental decoding, with static shapes.

    Attributes:
      keys, values: one `[batch, max_len, kv_heads, head_dim]` array per layer (rotated keys).
      segment_ids: `[batch, max_len]` int32 segment of each filled slot; 0 = empty or padding.
      end: `[]` int32, the number of slots filled; the next call writes from here.

    Size it for prompt + generated tokens: past `max_len`, writes under jit would be clamped.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segment_ids: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as transformers)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, axes: tuple[str, str], bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
        kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]},
    )


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE: `num_heads` queries share `num_kv_heads` keys."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = _linear(cfg, d, q_dim, ("embed", "heads"), cfg.qkv_bias, rngs)
        self.k_proj = _linear(cfg, d, kv_dim, ("embed", "kv_heads"), cfg.qkv_bias, rngs)
        self.v_proj = _linear(cfg, d, kv_dim, ("embed", "kv_heads"), cfg.qkv_bias, rngs)
        self.o_proj = _linear(cfg, q_dim, d, ("heads", "embed"), cfg.o_bias, rngs)
        self.num_kv_heads = cfg.num_kv_heads
        self.groups = cfg.num_heads // cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.dtype = cfg.dtype

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        start: jax.Array | int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`x: [b, s, d]`, `mask: [b, s, t]` (True = may attend); `kv`: this layer's cache, written
        at slot `start`. Returns `[b, s, d]` and the updated cache (None without one)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_kv_heads, self.groups, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, start, 0, 0))
            kv = (k, v)
        # softmax(q k^T / sqrt(head_dim) + mask) v; query head h reads kv head h // groups.
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(self.dtype))
        return self.o_proj(out.reshape(b, s, -1)), kv


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), bias, rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), bias, rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: attention then SwiGLU, each added to the residual stream."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv, start):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Llama(nnx.Module):
    """A Llama-family causal LM.

    Call `model(tokens [b, s], *, positions=None, segment_ids=None, cache=None)`:
      - tokens: int token ids.
      - positions: `[b, s]` RoPE positions; default `cache.end + arange(s)` (0.. without a cache).
      - segment_ids: `[b, s]` int; 0 marks padding, tokens attend only to earlier slots of the same
        segment (packed sequences never see each other); default all ones.
      - cache: a `KVCache` from `init_cache`; the new keys/values are written at `cache.end`.
      - last_only: return logits of the last slot only, `[b, 1, vocab]` (generation's prefill).
    Returns float32 logits `[b, s, vocab]`, and with a cache also the updated cache.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=config.dtype,
            param_dtype=config.param_dtype, embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs,
        )
        self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=config.dtype,
                            param_dtype=config.param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size,
                                   ("embed", "vocab"), False, rngs)

    def init_cache(self, batch: int, max_len: int, *, dtype: Any = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated).

        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2,
        ...                   num_heads=2, num_kv_heads=1)
        >>> Llama(cfg, rngs=nnx.Rngs(0)).init_cache(3, 10).keys[1].shape
        (3, 10, 1, 4)
        """
        cfg = self.config
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype or cfg.dtype) for _ in range(cfg.num_layers))
        return KVCache(keys=zeros, values=zeros, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                       end=jnp.zeros((), jnp.int32))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        cfg = self.config
        if tokens.ndim != 2:
            raise ShapeError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        b, s = tokens.shape
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and arr.shape != (b, s):
                raise ShapeError(f"{name} must have the tokens' shape {(b, s)}, got {arr.shape}")
        if cache is not None:
            # Under jit `end` is traced and cannot be checked: writes past max_len would be clamped
            # by XLA, so callers size the cache for prompt + new tokens (as `generate` does).
            end = 0 if isinstance(cache.end, jax.core.Tracer) else int(cache.end)
            if cache.segment_ids.shape[0] != b or end + s > cache.max_len:
                raise ShapeError(f"cache holds {cache.segment_ids.shape[0]} rows of "
                                 f"{cache.max_len} slots ({end} filled); tokens are {b} rows "
                                 f"of {s}")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))

        # Keys are the cache slots (or the tokens themselves without a cache).
        query_slots = start + jnp.arange(s, dtype=jnp.int32)
        if cache is None:
            key_segments, key_slots = segment_ids, query_slots
        else:
            key_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, start))
            key_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        mask = ((key_slots[None, None, :] <= query_slots[None, :, None])
                & (segment_ids[:, :, None] == key_segments[:, None, :])
                & (key_segments[:, None, :] != 0))

        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
        angles = jnp.concatenate([angles, angles], axis=-1)  # [b, s, head_dim]
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        x = self.embed_tokens(tokens)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = layer(x, cos, sin, mask, kv, start)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        x = self.norm(x[:, -1:] if last_only else x)
        logits = self.embed_tokens.attend(x) if cfg.tie_word_embeddings else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(keys=tuple(keys), values=tuple(values), segment_ids=key_segments,
                               end=start + s)

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Logits `[b, s, vocab]` of a causal-LM batch (`tokens`, `positions`, `segment_ids`)."""
        return self(batch["tokens"], positions=batch.get("positions"),
                    segment_ids=batch.get("segment_ids"))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        allow_pickle: bool = False,
    ) -> Llama:
        """Load a Hugging Face Llama/Qwen2 checkpoint (local directory or hub id).

        The model is built abstractly (`nnx.eval_shape`) and filled from the safetensors, so no
        random initialisation is spent on weights that are overwritten.

        Raises:
          CheckpointError: missing files, pickle weights without `allow_pickle`, or tensors that do
            not fit the config (naming the parameter).
          ConfigError: an unsupported architecture.
        """
        directory = resolve_model_dir(name_or_path)
        hf_config = read_config(directory)
        config = dataclasses.replace(
            LlamaConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype),
            eos_ids=read_eos_ids(directory, hf_config))
        arrays = load_safetensors(directory, dtype=param_dtype, allow_pickle=allow_pickle)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        assign_params(model, params_from_hf(arrays, config), source=str(directory))
        return model


def hf_name_to_path(name: str) -> tuple[str, bool]:
    """Our parameter path of a Hugging Face tensor name, and whether the tensor is transposed.

    The one place that maps Hugging Face Llama names: drop the `model.` prefix, dots become "/",
    and `weight` becomes `kernel` (linear, stored `[d_out, d_in]`: transposed), `embedding` or
    `scale`.

    >>> hf_name_to_path("model.layers.0.self_attn.q_proj.weight")
    ('layers/0/self_attn/q_proj/kernel', True)
    >>> hf_name_to_path("model.norm.weight")
    ('norm/scale', False)
    """
    *module, leaf = name.removeprefix("model.").split(".")
    owner = module[-1] if module else ""
    if leaf == "weight" and (owner.endswith("_proj") or owner == "lm_head"):
        leaf, transpose = "kernel", True
    elif leaf == "weight" and owner == "embed_tokens":
        leaf, transpose = "embedding", False
    elif leaf == "weight" and owner.endswith("norm"):
        leaf, transpose = "scale", False
    else:
        transpose = False
    return "/".join([*module, leaf]), transpose


def path_to_hf_name(path: str) -> str:
    """The Hugging Face tensor name of our parameter path (inverse of `hf_name_to_path`).

    >>> path_to_hf_name("layers/1/mlp/down_proj/kernel")
    'model.layers.1.mlp.down_proj.weight'
    """
    *module, leaf = path.split("/")
    leaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
    prefix = "" if module[:1] == ["lm_head"] else "model."
    return prefix + ".".join([*module, leaf])


def params_from_hf(arrays: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> `{our path: array}` in our layout (kernels `[d_in, d_out]`).

    Drops `lm_head.weight` when embeddings are tied and buffers transformers does not load
    (`rotary_emb.inv_freq`); any other unknown name is left for `assign_params` to report.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        path, transpose = hf_name_to_path(name)
        if transpose and np.ndim(array) != 2:
            raise CheckpointError(f"tensor {name!r} should be a 2-d linear weight, got shape "
                                  f"{np.shape(array)}")
        out[path] = array.T if transpose else array
    return out
