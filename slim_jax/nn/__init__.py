"""Flax NNX modules over `slim_jax.core`: adapted linear layers, injection, adapter state.

    >>> from flax import nnx
    >>> from slim_jax.nn import SlimConfig, inject
    >>> model = nnx.List([nnx.Linear(8, 8, rngs=nnx.Rngs(0))])
    >>> inject(model, "0", SlimConfig(rank=2, num_clusters=2), rngs=nnx.Rngs(1))
    ['0']
"""

from slim_jax.nn.config import LoRAConfig, SlimConfig
from slim_jax.nn.injection import AdaptedLinear, inject, module_path
from slim_jax.nn.lora_linear import LoRALinear
from slim_jax.nn.penalty import adapter_l1
from slim_jax.nn.slim_linear import SlimLinear
from slim_jax.nn.spec import ADAPTER_SPEC_KEY, AdapterSpec, adapter_spec, inject_spec
from slim_jax.nn.state import (
    adapted_layers,
    adapter_apply,
    adapter_paths,
    adapter_state,
    merge_adapters,
    set_token_mask,
    split_adapters,
    token_mask,
    unmerge_adapters,
)
from slim_jax.nn.variables import AdapterParam, ClusterState, TokenMask
from slim_jax.nn.view import inference_view, training_view

__all__ = [
    "ADAPTER_SPEC_KEY",
    "AdaptedLinear",
    "AdapterParam",
    "AdapterSpec",
    "ClusterState",
    "LoRAConfig",
    "LoRALinear",
    "SlimConfig",
    "SlimLinear",
    "TokenMask",
    "adapted_layers",
    "adapter_apply",
    "adapter_l1",
    "adapter_paths",
    "adapter_spec",
    "adapter_state",
    "inference_view",
    "inject",
    "inject_spec",
    "merge_adapters",
    "module_path",
    "set_token_mask",
    "split_adapters",
    "token_mask",
    "training_view",
    "unmerge_adapters",
]
