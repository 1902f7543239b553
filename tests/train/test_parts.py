"""The trainer's parts: schedule, optimiser, loss, token masks, config checks, MFU, SIGTERM."""

from __future__ import annotations

import itertools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.t5 import T5, T5Config
from slim_jax.nn import SlimConfig, inject
from slim_jax.parallel.topology import peak_flops_per_device
from slim_jax.train import (
    OptimizerConfig,
    PreemptionGuard,
    TrainConfig,
    learning_rate_schedule,
    make_optimizer,
    target_cross_entropy,
)
from slim_jax.train.forward import token_mask_groups
from slim_jax.train.metrics import mfu, training_flops_per_token
from slim_jax.train.state import resolve_frozen_dtype


def test_warmup_then_cosine_to_the_final_ratio():
    config = OptimizerConfig(learning_rate=2.0, warmup_steps=4, final_lr_ratio=0.1)
    lr = [float(learning_rate_schedule(config, total_steps=20)(t)) for t in range(21)]
    np.testing.assert_allclose(lr[:5], [0.0, 0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    assert all(a >= b for a, b in itertools.pairwise(lr[4:]))  # decays after warm-up
    np.testing.assert_allclose(lr[12], 0.2 + 1.8 * 0.5, rtol=1e-6)  # half way down the cosine
    np.testing.assert_allclose(lr[20], 0.2, rtol=1e-6)


def test_clipping_and_weight_decay():
    params = {"w": jnp.ones(4)}
    tx = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, clip_norm=1.0,
                                        weight_decay=0.5, b1=0.9), total_steps=10)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(4, 100.0)}, state, params)
    mu = state[1][0].mu["w"]  # Adam's first moment saw the clipped gradient: norm 1
    np.testing.assert_allclose(float(jnp.linalg.norm(mu)), 0.1 * 1.0, rtol=1e-5)
    updates, _ = tx.update({"w": jnp.zeros(4)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * 0.5 * 1.0, rtol=1e-5)


def test_cross_entropy_counts_only_target_tokens():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [4, 0, 1]])
    mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    logp = jax.nn.log_softmax(logits)
    manual = -(logp[0, 0, 1] + logp[0, 2, 3] + logp[1, 2, 1])
    np.testing.assert_allclose(float(target_cross_entropy(logits, targets, mask)), float(manual),
                               rtol=1e-6)
    assert float(target_cross_entropy(logits, targets, jnp.zeros((2, 3)))) == 0.0


def test_encoder_and_decoder_slim_layers_get_their_own_token_masks():
    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                      num_decoder_layers=1, num_heads=2)
    model = T5(config, rngs=nnx.Rngs(0))
    inject(model, r"(SelfAttention|EncDecAttention)/(q|v)$",
           SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(1))
    batch = {"enc_segment_ids": jnp.array([[1, 1, 0]]), "dec_segment_ids": jnp.array([[1, 0]])}
    groups = {tuple(paths): mask.tolist() for paths, mask in token_mask_groups(model, batch)}
    assert groups == {
        ("decoder/block/0/layer/1/EncDecAttention/v", "encoder/block/0/layer/0/SelfAttention/q",
         "encoder/block/0/layer/0/SelfAttention/v"): [[1.0, 1.0, 0.0]],
        ("decoder/block/0/layer/0/SelfAttention/q", "decoder/block/0/layer/0/SelfAttention/v",
         "decoder/block/0/layer/1/EncDecAttention/q"): [[1.0, 0.0]],
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, r"steps must be >= 1"),
        ("grad_accum_steps", 0, r"grad_accum_steps must be >= 1"),
        ("frozen_dtype", "fp8", r"frozen_dtype must be one of .*, got 'fp8'"),
        ("l1_coeff", -1.0, r"l1_coeff must be >= 0"),
    ],
)
def test_train_config_checks(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_optimizer_config_checks():
    with pytest.raises(ConfigError, match=r"clip_norm must be > 0 or None"):
        OptimizerConfig(clip_norm=0.0)
    with pytest.raises(ConfigError, match=r"final_lr_ratio must be in \[0, 1\]"):
        OptimizerConfig(final_lr_ratio=2.0)


def test_frozen_dtype_policy():
    assert resolve_frozen_dtype("auto", "cpu") is None
    assert resolve_frozen_dtype("auto", "gpu") == jnp.bfloat16
    assert resolve_frozen_dtype("keep", "tpu") is None
    assert resolve_frozen_dtype("float16") == jnp.float16


def test_mfu_estimate():
    assert training_flops_per_token(n_frozen=100, n_trained=10) == 460.0
    assert mfu(2.0, 460.0, 920.0) == 1.0
    assert mfu(2.0, 460.0, None) is None

    class Device:
        device_kind = "TPU v5 lite"

    assert peak_flops_per_device(Device()) == 197e12


def test_preemption_guard_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a))
    try:
        with PreemptionGuard() as guard:
            signal.raise_signal(signal.SIGTERM)
            assert guard.reached(1) and not seen
        signal.raise_signal(signal.SIGTERM)
        assert len(seen) == 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_optax_state_shapes_follow_nnx_state():
    # The trainer relies on optax mapping over nnx.State leaves (Variables keep their metadata).
    state = nnx.State({"w": nnx.LoRAParam(jnp.ones(3), logical_axes=("embed",))})
    mu = optax.adam(1e-3).init(state)[0].mu
    assert mu["w"].get_metadata()["logical_axes"] == ("embed",)
