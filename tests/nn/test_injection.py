"""inject: path regexes over nested modules and lists, unchanged kernel paths, named errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.nn import LoRAConfig, LoRALinear, SlimConfig, SlimLinear, inject

LORA = LoRAConfig(rank=2)
SLIM = SlimConfig(rank=2, num_clusters=2, num_lora_experts=2, num_identity_experts=1)


def param_paths(model, *filters):
    return {path for path, _ in nnx.to_flat_state(nnx.state(model, *filters))}


def test_inject_adapts_matching_layers_in_lists(toy, tokens):
    before = toy(tokens)
    paths = inject(toy, r"attn/(q|v)_proj$", LORA, rngs=nnx.Rngs(1))
    assert paths == ["layers/0/attn/q_proj", "layers/0/attn/v_proj",
                     "layers/1/attn/q_proj", "layers/1/attn/v_proj"]
    assert isinstance(toy.layers[1].attn.v_proj, LoRALinear)
    assert type(toy.layers[1].attn.k_proj) is nnx.Linear
    np.testing.assert_array_equal(toy(tokens), before)  # B = 0


def test_kernel_paths_unchanged_and_base_checkpoints_load(toy_cls, tokens):
    base = toy_cls(nnx.Rngs(0))
    checkpoint = nnx.state(base)
    adapted = toy_cls(nnx.Rngs(5))  # different weights, to be overwritten by the checkpoint
    inject(adapted, "up_proj", SLIM, rngs=nnx.Rngs(1))
    inject(adapted, "proj", LORA, rngs=nnx.Rngs(2))
    assert param_paths(adapted, nnx.Param) - param_paths(adapted, nnx.LoRAParam) == \
        param_paths(base, nnx.Param)
    nnx.update(adapted, checkpoint)
    np.testing.assert_array_equal(adapted(tokens), base(tokens))
    assert isinstance(adapted.layers[0].up_proj, SlimLinear)


def test_no_match_lists_available_layers(toy):
    with pytest.raises(ConfigError, match=r"matches no nnx.Linear.*: head, layers/0/attn/k_proj,"):
        inject(toy, "gate_proj", LORA, rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        inject(toy, "q_proj(", LORA, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="LoRAConfig or a SlimConfig"):
        inject(toy, "q_proj", {"rank": 2}, rngs=nnx.Rngs(1))


def test_adapted_layers_are_not_adapted_again(toy):
    inject(toy, "q_proj", LORA, rngs=nnx.Rngs(1))
    first = toy.layers[0].attn.q_proj
    with pytest.raises(ConfigError, match="already adapted: layers/0/attn/q_proj"):
        inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(2))
    assert inject(toy, "proj", SLIM, rngs=nnx.Rngs(2))[0] == "layers/0/attn/k_proj"
    assert toy.layers[0].attn.q_proj is first


def test_shared_layer_is_replaced_everywhere():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Dict({"proj": nnx.Linear(4, 4, rngs=rngs)})
            self.decoder_proj = self.encoder["proj"]

    model = Tied(nnx.Rngs(0))
    assert inject(model, "decoder_proj", LORA, rngs=nnx.Rngs(1)) == ["decoder_proj"]
    assert isinstance(model.encoder["proj"], LoRALinear)
    assert model.encoder["proj"] is model.decoder_proj


def test_injected_model_jits_in_train_and_eval(toy, tokens, randomize):
    inject(toy, "q_proj", SLIM, rngs=nnx.Rngs(1))
    inject(toy, "proj", LORA, rngs=nnx.Rngs(2))
    randomize(toy)
    forward = nnx.jit(lambda m, x: m(x))
    train_out = forward(toy, tokens)
    assert int(toy.layers[0].attn.q_proj.cluster_count[...]) == 1
    toy.eval()
    eval_out = forward(toy, tokens)
    np.testing.assert_allclose(eval_out, toy(tokens), rtol=1e-5, atol=1e-5)
    assert jax.tree.leaves(train_out)[0].shape == (2, 5, 4)
