"""The Llama-family decoder (Llama 2/3, Qwen2-style q/k/v bias) in Flax NNX, matching transformers.

Module names follow Hugging Face's, so parameter paths read `layers/0/self_attn/q_proj/kernel`,
`layers/0/mlp/gate_proj/kernel`, ... and adapter `inject` / PEFT `target_modules` match the same
layers. Linear kernels are `[d_in, d_out]`; every parameter carries `logical_axes` metadata.

One block (pre-norm):
    h   = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

Attention masks come from `segment_ids` (0 = padding; tokens attend only within their own segment,
so packed sequences work) and slot order (causal). Decoding uses an explicit `KVCache` of static
shape, so a whole generation compiles once. Hugging Face conversion lives in `llama_hf.py`, the
shared layers in `layers.py`; `Llama` implements `slim_jax.models.family.ModelFamily`.

>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
...                   num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 5), jnp.int32)).shape
(2, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from slim_jax import hub
from slim_jax.errors import ConfigError, ShapeError
from slim_jax.models import hf, llama_hf
from slim_jax.models.layers import (
    ExecutionConfig,
    RMSNorm,
    RopeScaling,
    apply_rope,
    attention,
    linear,
    remat_layer,
    rope_cos_sin,
    rope_frequencies,
    write_kv,
)
from slim_jax.nn.stack import LayerStack
from slim_jax.parallel.rules import DEFAULT_RULES, Rules
from slim_jax.parallel.sharding import constrain
from slim_jax.tokenizer import Tokenizer

HF_MODEL_TYPES = llama_hf.HF_MODEL_TYPES


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ExecutionConfig):
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
      attention, remat: how it runs (`slim_jax.models.layers.ExecutionConfig`).
      scan_layers: hold the decoder layers stacked on a leading `layers` axis
        (`slim_jax.nn.stack.LayerStack`) and apply them with `jax.lax.scan`: one compiled layer
        body instead of `num_layers` copies (compile time and program size no longer grow with
        depth). Same numbers, same initialisation; checkpoints and adapters keep per-layer names.
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
    scan_layers: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
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
                param_dtype: Any = jnp.float32, **overrides: Any) -> LlamaConfig:
        """The config of a Hugging Face `config.json` (`llama_hf.config_fields`); `overrides`
        set further fields (e.g. `attention="jax"`).

        >>> LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
        ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}).head_dim
        4
        """
        return cls(**llama_hf.config_fields(config), dtype=dtype, param_dtype=param_dtype,
                   **overrides)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for incremental decoding, with static shapes.

    Attributes:
      keys, values: one `[batch, max_len, kv_heads, head_dim]` array per layer (rotated keys);
        with `scan_layers` one array `[num_layers, batch, max_len, kv_heads, head_dim]`.
      segment_ids: `[batch, max_len]` int32 segment of each filled slot; 0 = empty or padding.
      end: `[]` int32, the number of slots filled; the next call writes from here.

    Size it for prompt + generated tokens: past `max_len`, writes under jit would be clamped.
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    segment_ids: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, axes: tuple[str, str], bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
    return linear(d_in, d_out, axes, bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  rngs=rngs)


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
        self.implementation = cfg.attention

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
        x = constrain(x, ("batch", "length", None))  # under a mesh: batch split, heads on tensor
        q = self.q_proj(x).reshape(b, s, self.num_kv_heads * self.groups, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q = constrain(q, ("batch", "length", "heads", None))
        k, v = (constrain(t, ("batch", "length", "kv_heads", None)) for t in (k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = write_kv(kv[0], k, start), write_kv(kv[1], v, start)
            kv = (k, v)
        # softmax(q k^T / sqrt(head_dim) + mask) v; query head h reads kv head h // groups.
        # Without a cache the mask is causal over the tokens themselves: blocks skip the future.
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5, dtype=self.dtype,
                        implementation=self.implementation, causal=kv is None)
        return self.o_proj(out), kv


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), bias, rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), bias, rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, ("batch", "length", None))  # under a mesh: batch split, mlp on tensor
        h = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "mlp"))
        return self.down_proj(h)


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
        layers = [LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
        # Built one by one either way, so a scanned model starts from the unrolled one's weights.
        self.layers = LayerStack(layers) if config.scan_layers else nnx.List(layers)
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
        if cfg.scan_layers:  # one array stacked over the layers, scanned with them
            zeros: Any = jnp.zeros((cfg.num_layers, *shape), dtype or cfg.dtype)
        else:
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

        cos, sin = rope_cos_sin(positions, rope_frequencies(cfg.head_dim, cfg.rope_theta,
                                                            cfg.rope_scaling))

        x = self.embed_tokens(tokens)
        call = remat_layer(cfg.remat)  # LlamaConfig.remat: recompute activations in the backward
        if cfg.scan_layers:  # one layer body in a jax.lax.scan over the stacked layers
            x, kv = self.layers.scan(
                lambda layer, x, kv: call(layer, x, cos, sin, mask, kv, start), x,
                None if cache is None else (cache.keys, cache.values))
            keys, values = (None, None) if kv is None else kv
        else:
            keys, values = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                x, kv = call(layer, x, cos, sin, mask, kv, start)
                if kv is not None:
                    keys.append(kv[0])
                    values.append(kv[1])
            keys, values = tuple(keys), tuple(values)
        x = self.norm(x[:, -1:] if last_only else x)
        logits = self.embed_tokens.attend(x) if cfg.tie_word_embeddings else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(keys=keys, values=values, segment_ids=key_segments,
                               end=start + s)

    # ------------------------------------------------- the model family (slim_jax.models.family)

    layout: ClassVar[Literal["causal"]] = "causal"
    prompt_side: ClassVar[Literal["left"]] = "left"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    hf_name_to_path = staticmethod(llama_hf.hf_name_to_path)
    path_to_hf_name = staticmethod(llama_hf.path_to_hf_name)

    def batch_logits(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Logits `[b, s, vocab]` of a causal-LM batch (`tokens`, `positions`, `segment_ids`)."""
        return self(batch["tokens"], positions=batch.get("positions"),
                    segment_ids=batch.get("segment_ids"))

    def mask_key(self, layer_path: str) -> str:
        """Every layer sees the batch's `tokens`."""
        return "segment_ids"

    def encode_prompt(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """The prompt's ids, BOS in front when the tokenizer has one ("" is just BOS)."""
        return tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)

    def prefill(self, tokens: jax.Array, segment_ids: jax.Array, max_new_tokens: int
                ) -> tuple[jax.Array, tuple[KVCache, jax.Array]]:
        """Left-padded prompts `[b, p]` into a cache of `p + max_new_tokens` slots; the state is
        `(cache, next RoPE position [b])`."""
        batch, length = tokens.shape
        # Left padding: a row's real tokens sit at positions 0..n-1 whatever its padding.
        positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
        logits, cache = self(tokens, positions=positions, segment_ids=segment_ids,
                             cache=self.init_cache(batch, length + max_new_tokens), last_only=True)
        return logits[:, 0], (cache, positions[:, -1] + 1)

    def decode_step(self, tokens: jax.Array, state: tuple[KVCache, jax.Array]
                    ) -> tuple[jax.Array, tuple[KVCache, jax.Array]]:
        """One token per row `[b]` at each row's next position."""
        cache, position = state
        logits, cache = self(tokens[:, None], positions=position[:, None],
                             segment_ids=jnp.ones_like(tokens[:, None], jnp.int32), cache=cache)
        return logits[:, 0], (cache, position + 1)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        allow_pickle: bool = False,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        **config_overrides: Any,
    ) -> Llama:
        """Load a Hugging Face Llama/Qwen2 checkpoint (local directory or hub id).

        The model is built abstractly (`nnx.eval_shape`) and filled from the safetensors, so no
        random initialisation is spent on weights that are overwritten. `config_overrides` set
        `LlamaConfig` fields the checkpoint does not hold (e.g. `attention="jax"`). With a `mesh`,
        every tensor goes straight into the sharding its `logical_axes` get under `rules`, each
        process reading only the safetensors slices its devices hold (`hf.assign_params`).

        Raises:
          CheckpointError: missing files, pickle weights without `allow_pickle`, or tensors that do
            not fit the config (naming the parameter).
          ConfigError: an unsupported architecture.
        """
        directory = hub.resolve_model_dir(name_or_path)
        hf_config = hf.read_config(directory)
        config = dataclasses.replace(
            LlamaConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype,
                                **config_overrides),
            eos_ids=hf.read_eos_ids(directory, hf_config))
        arrays = hf.load_safetensors(directory, dtype=param_dtype, allow_pickle=allow_pickle,
                                     lazy=mesh is not None)
        model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
        hf.assign_params(model, llama_hf.params_from_hf(arrays, config), source=str(directory),
                         mesh=mesh, rules=rules)
        return model
