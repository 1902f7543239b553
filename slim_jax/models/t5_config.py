"""The configuration of a T5 v1.1 / FLAN-T5 (or original T5) model, as transformers names it.

>>> T5Config(feed_forward_proj="gated-gelu").is_gated, T5Config(feed_forward_proj="relu").is_gated
(True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from slim_jax.errors import ConfigError
from slim_jax.models import t5_hf
from slim_jax.models.layers import ExecutionConfig

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config(ExecutionConfig):
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
      attention, remat: how it runs (`slim_jax.models.layers.ExecutionConfig`; remat acts on
        each encoder / decoder block of the training forward pass, decoding never needs it).
      scan_layers: hold each stack's blocks stacked on a leading `layers` axis
        (`slim_jax.nn.stack.LayerStack`) and apply them with `jax.lax.scan` (remat inside the
        body): one compiled block per stack instead of `num_layers` copies. The relative position
        bias table, which only the first block holds, then lives on the stack itself
        (`encoder/relative_attention_bias`), outside the scanned body, computed once as before.
        Same numbers, same initialisation; Hugging Face checkpoints and adapters keep per-layer
        names.
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
    scan_layers: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
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

    # The special ids every family's config names (slim_jax.models.family.ModelFamily).
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
        """The config of a Hugging Face `config.json` dict (`t5_hf.config_fields`); `overrides`
        win (e.g. `dtype=`).

        >>> c = T5Config.from_hf({"model_type": "t5", "d_model": 16, "num_layers": 2,
        ...                       "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
        >>> (c.d_model, c.num_decoder_layers, c.tie_word_embeddings, c.scale_decoder_outputs)
        (16, 2, False, False)
        """
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**t5_hf.config_fields(config, known, cls.num_layers), **overrides})

