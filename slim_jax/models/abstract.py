"""Models as shapes only: any family with its adapters, built under `nnx.eval_shape`, so that a
full-size model costs no host or device memory until it is loaded (or only compiled for a pod).

>>> from slim_jax.models.llama import LlamaConfig
>>> from slim_jax.nn import LoRAConfig
>>> config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
...                      num_layers=32, num_heads=32, num_kv_heads=8)
>>> model = abstract_model(config, [("q_proj|v_proj", LoRAConfig(rank=16))])
>>> model.layers[31].self_attn.q_proj.kernel.shape, type(model.layers[0].self_attn.q_proj).__name__
((4096, 4096), 'LoRALinear')
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from slim_jax.models.registry import family_for_config
from slim_jax.nn import AdapterSpec, LoRAConfig, SlimConfig, inject, inject_spec

Adapters = AdapterSpec | Sequence[tuple[str, LoRAConfig | SlimConfig]]


def abstract_model(config: object, adapter_spec: Adapters | None = None) -> nnx.Module:
    """The model of `config` (a `LlamaConfig`, `T5Config`, or a registered family's config) with
    its adapters, every variable a `jax.ShapeDtypeStruct` (carrying its `logical_axes`).

    Args:
      config: the model config; its class picks the family (`registry.family_for_config`).
      adapter_spec: None (no adapters), an adapter spec (`slim_jax.nn.adapter_spec`: what a
        checkpoint records), or `(layer path regex, LoRAConfig | SlimConfig)` pairs injected in
        order (`slim_jax.nn.inject`).

    Returns:
      The abstract model: `nnx.split` / `nnx.state` give shapes and dtypes for `jax.jit(...)
      .lower(...)`, sharding rules or `assign_params` (which fills it with real arrays).
    """
    cls = family_for_config(config)

    def build() -> nnx.Module:
        model = cls(config, rngs=nnx.Rngs(0))
        if adapter_spec and isinstance(adapter_spec[0], dict):  # a JSON adapter spec
            inject_spec(model, list(adapter_spec), rngs=nnx.Rngs(1))
        else:
            for pattern, adapter in adapter_spec or ():
                inject(model, pattern, adapter, rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(build)
