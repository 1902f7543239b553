"""Abstract construction: every family with its adapters as shapes only, equal in structure,
shape, dtype and logical axes to the concrete model."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.abstract import abstract_model
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.t5 import T5, T5Config
from slim_jax.nn import LoRAConfig, SlimConfig, adapter_spec, inject


def _described(model: nnx.Module) -> dict:
    return {path: (tuple(v.shape), str(v.dtype), getattr(v, "logical_axes", None), type(v))
            for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and v.get_value() is not None}  # not empty slots


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_abstract_model_equals_the_concrete_one_in_shapes(family):
    if family == "llama":
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=4, num_kv_heads=2)
        concrete = Llama(config, rngs=nnx.Rngs(0))
        inject(concrete, "q_proj|v_proj", SlimConfig(rank=2, num_clusters=2), rngs=nnx.Rngs(1))
    else:
        config = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                          num_decoder_layers=2, num_heads=4)
        concrete = T5(config, rngs=nnx.Rngs(0))
        inject(concrete, r"Attention/(q|v)$", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    spec = adapter_spec(concrete)
    for adapters in (spec, [("q_proj|v_proj", SlimConfig(rank=2, num_clusters=2))]
                     if family == "llama" else [(r"Attention/(q|v)$", LoRAConfig(rank=4))]):
        abstract = abstract_model(config, adapters)
        assert _described(abstract) == _described(concrete)
        leaves = jax.tree.leaves(nnx.state(abstract))
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert len(_described(abstract_model(config))) < len(_described(concrete))


def test_unknown_config_is_named():
    with pytest.raises(ConfigError, match="no model family is registered for a dict"):
        abstract_model({"vocab_size": 8})
