"""Hugging Face T5 / mT5 checkpoints <-> slim_jax `T5`: config parsing, tensor names and parameter
conversion, the one place that knows transformers' T5 names.

>>> path_to_hf_name("encoder/block/0/layer/1/DenseReluDense/wo/kernel")
'encoder.block.0.layer.1.DenseReluDense.wo.weight'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from slim_jax.errors import ConfigError
from slim_jax.models.hf import convert_params

HF_MODEL_TYPES = ("t5", "mt5")


def config_fields(config: Mapping[str, Any], known: Collection[str], default_layers: int
                  ) -> dict[str, Any]:
    """`T5Config` fields (of the names in `known`) of a Hugging Face `config.json` dict.

    transformers 5 writes `tie_word_embeddings: true` for every T5 and keeps the real rule in
    `scale_decoder_outputs`; transformers 4 configs say `tie_word_embeddings: false` for v1.1
    models. Both are read; `T5.from_pretrained` also unties a head the checkpoint holds.

    Raises:
      ConfigError: another architecture (model_type other than t5 / mt5), or a bad value.

    >>> c = config_fields({"model_type": "t5", "d_model": 16, "num_layers": 2,
    ...                    "tie_word_embeddings": False}, {"d_model", "num_layers"}, 8)
    >>> (c["d_model"], c["num_decoder_layers"], c["tie_word_embeddings"])
    (16, 2, False)
    """
    model_type = config.get("model_type", "t5")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a T5; expected 't5' or 'mt5' "
                          "(umt5, longt5 and switch_transformers are other architectures)")
    if "scale_decoder_outputs" in config:  # transformers 5 (its tie_word_embeddings is moot)
        scale = tied = bool(config["scale_decoder_outputs"])
    else:
        scale = tied = config.get("tie_word_embeddings", True) is not False
    fields = set(known) - {"dtype", "param_dtype"}
    values = {k: v for k, v in config.items() if k in fields and v is not None}
    values["num_decoder_layers"] = (config.get("num_decoder_layers")
                                    or config.get("num_layers", default_layers))
    values.update(tie_word_embeddings=tied, scale_decoder_outputs=scale)
    for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if isinstance(values.get(name), list):
            values[name] = values[name][0]
    return values


def tie_as_checkpoint(config: Any, tensors: Mapping[str, np.ndarray]) -> Any:
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


def params_from_hf(arrays: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """Hugging Face T5 tensors -> `{our path: array}` in our layout (kernels `[d_in, d_out]`).

    Drops the names in `HF_IGNORED_NAMES`, and `lm_head.weight` when the head is tied; any other
    unknown name is left for `hf.assign_params` to report. With `config.scan_layers` the relative
    position bias tables go to their stacks (`stacked_bias_path`); every other per-layer name
    stays, for `hf.assign_params` to stack.
    """
    params = convert_params(arrays, hf_name_to_path, lambda name: (
        name in HF_IGNORED_NAMES or (name == "lm_head.weight" and config.tie_word_embeddings)))
    if config.scan_layers:
        params = {stacked_bias_path(path): array for path, array in params.items()}
    return params


_FIRST_BLOCK_BIAS = re.compile(
    r"^(encoder|decoder)/block/0/layer/0/SelfAttention/(relative_attention_bias/)")


def stacked_bias_path(path: str) -> str:
    """The path of a parameter in a scanned T5 (`T5Config.scan_layers`), whose relative position
    bias table belongs to the stack rather than to its first block; other paths unchanged.

    >>> stacked_bias_path("encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding")
    'encoder/relative_attention_bias/embedding'
    """
    return _FIRST_BLOCK_BIAS.sub(r"\1/\2", path)
