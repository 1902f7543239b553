"""Hugging Face Llama-family checkpoints (llama, qwen2) <-> slim_jax `Llama`: config parsing,
tensor names and parameter conversion, the one place that knows transformers' Llama names.

>>> hf_name_to_path("model.layers.0.mlp.up_proj.weight")
('layers/0/mlp/up_proj/kernel', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from slim_jax.errors import ConfigError
from slim_jax.models.hf import convert_params
from slim_jax.models.layers import RopeScaling

HF_MODEL_TYPES = ("llama", "qwen2")


def config_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """`LlamaConfig` fields of a Hugging Face `config.json` (model_type "llama" or "qwen2").

    Reads both the transformers 5 `rope_parameters` and the older `rope_theta` + `rope_scaling`.

    Raises:
      ConfigError: another architecture, activation, RoPE type, or active sliding window.

    >>> fields = config_fields({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
    ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> fields["num_kv_heads"], fields["rope_scaling"]
    (2, None)
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
    return dict(
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
    )


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


def params_from_hf(arrays: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> `{our path: array}` in our layout (kernels `[d_in, d_out]`).

    Drops `lm_head.weight` when embeddings are tied and buffers transformers does not load
    (`rotary_emb.inv_freq`); any other unknown name is left for `assign_params` to report.
    """
    return convert_params(arrays, hf_name_to_path, lambda name: (
        name.endswith("rotary_emb.inv_freq")
        or (name == "lm_head.weight" and config.tie_word_embeddings)))
