"""Rematerialisation changes memory, not maths: every `remat` policy gives the loss, adapter
gradients and SLIM state of no remat (1e-5) on a two-layer stack with SLIM and LoRA adapters, and
representative policies do so on the decoder-only and the encoder-decoder family."""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.layers import REMAT_POLICIES
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.t5 import T5, T5Config
from slim_jax.nn import LoRAConfig, SlimConfig, inject

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

LLAMA = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2)
T5_CFG = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8)


def _model(family: str, remat: str) -> nnx.Module:
    if family == "llama":
        model = Llama(dataclasses.replace(LLAMA, remat=remat), rngs=nnx.Rngs(0))
        inject(model, "q_proj", SlimConfig(rank=2, num_clusters=2), rngs=nnx.Rngs(1))
        inject(model, "down_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(2))
    else:
        model = T5(dataclasses.replace(T5_CFG, remat=remat), rngs=nnx.Rngs(0))
        inject(model, r"Attention/(q|v)$", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    for _, leaf in nnx.iter_graph(model):  # non-zero B factors: every gradient path matters
        if isinstance(leaf, nnx.LoRAParam):
            leaf[...] = leaf[...] + 0.1
    return model


def _batch(family: str) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    ids = lambda shape: jnp.asarray(rng.integers(1, 32, shape), jnp.int32)
    if family == "llama":
        return {"tokens": ids((2, 6)), "segment_ids": jnp.ones((2, 6), jnp.int32),
                "targets": ids((2, 6))}
    return {"enc_tokens": ids((2, 5)), "enc_segment_ids": jnp.ones((2, 5), jnp.int32),
            "dec_tokens": ids((2, 4)), "dec_segment_ids": jnp.ones((2, 4), jnp.int32),
            "targets": ids((2, 4))}


@nnx.jit
def _loss_and_grads(model, batch):
    def loss(model):
        logits = model.batch_logits(batch)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1).mean()

    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


def _assert_same_grads(grads, ref_grads, policy: str) -> None:
    got, want = (jax.tree.leaves(nnx.to_pure_dict(g)) for g in (grads, ref_grads))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=policy)


# The loss and gradient equality compiles a gradient program per policy (5-10 s each on a CI
# core, even for a two-layer toy: SLIM's routing and clustering make the program), so it runs on
# representative policies: "full" (`jax.checkpoint` without a policy: everything recomputed) and,
# per family, one of `jax.checkpoint_policies` that saves some values and recomputes the others
# (the `getattr` path every named policy takes). Every policy is traced below (no compilation):
# each gives a rematerialised gradient.
WHOLE_MODEL = {"llama": ("full", "dots_saveable"),
               "t5": ("full", "dots_with_no_batch_dims_saveable")}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_representative_remat_policies_give_a_models_loss_and_gradients(family):
    batch = _batch(family)
    ref_loss, ref_grads = _loss_and_grads(_model(family, "none"), batch)
    for policy in WHOLE_MODEL[family]:
        loss, grads = _loss_and_grads(_model(family, policy), batch)
        np.testing.assert_allclose(loss, ref_loss, atol=1e-5, err_msg=policy)
        _assert_same_grads(grads, ref_grads, policy)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_actually_rematerialises(policy):
    """The rematerialised gradient's jaxpr holds a checkpoint (remat) primitive, and only then;
    a named policy is the `jax.checkpoint_policies` policy of that name (traced, not compiled:
    `remat_layer` is the same for every family)."""
    model, batch = _model("t5", policy), _batch("t5")  # LoRA only: no state to thread
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    # As the train step runs it: jax.grad over the model merged from its parts.
    grad = jax.grad(lambda lora, rest: nnx.merge(graphdef, lora, rest, copy=True)
                    .batch_logits(batch).sum())
    jaxpr = str(jax.make_jaxpr(grad)(lora, rest))
    assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (policy != "none")
    if policy not in ("none", "full"):  # a function prints as its name (its address masked)
        saveable = getattr(jax.checkpoint_policies, policy)
        name = f"<function {policy} at" if inspect.isfunction(saveable) else str(saveable)
        assert f"policy={name}" in jaxpr


def test_unknown_policy_is_named():
    with pytest.raises(ConfigError, match="remat policy 'some' is not known"):
        dataclasses.replace(LLAMA, remat="some")
