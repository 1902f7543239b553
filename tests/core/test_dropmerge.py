"""Fast dynamic merging: exactness at p = 0, keep ratio and unbiasedness over keys, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.core.dropmerge import channel_masks, masked_lora_delta, masked_mixture_delta
from slim_jax.core.lora import lora_delta
from slim_jax.core.routing import lora_mixture_delta
from slim_jax.errors import ConfigError

D_IN, D_OUT, RANK = 16, 12, 4


@pytest.fixture(scope="module")
def factors():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, D_IN))
    a = jax.random.normal(k[1], (D_IN, RANK))
    b = jax.random.normal(k[2], (RANK, D_OUT))
    return x, a, b


def test_p_zero_is_exact(factors):
    x, a, b = factors
    masks = channel_masks(jax.random.key(1), D_IN, D_OUT, 0.0)
    np.testing.assert_array_equal(masked_lora_delta(x, a, b, 2.0, masks, 0.0),
                                  lora_delta(x, a, b, 2.0))
    ea, eb = jnp.stack([a, 2 * a]), jnp.stack([b, -b])
    gates = jnp.full((3, 2), 0.5)
    np.testing.assert_array_equal(masked_mixture_delta(x, ea, eb, gates, 2.0, masks, 0.0),
                                  lora_mixture_delta(x, ea, eb, gates, 2.0))


def test_kept_fraction_is_one_minus_p_over_many_keys():
    p, n_keys, d = 0.6, 2000, 32
    keys = jax.random.split(jax.random.key(2), n_keys)
    m_in, m_out = jax.jit(jax.vmap(lambda k: channel_masks(k, d, d, p)))(keys)
    kept = np.asarray(m_in.mean(-1) * m_out.mean(-1))  # fraction of the d x d delta kept
    assert abs(m_in.mean() - np.sqrt(1 - p)) < 5 * np.sqrt(0.4 * 0.6 / (n_keys * d))
    assert abs(kept.mean() - (1 - p)) < 5 * kept.std() / np.sqrt(n_keys)


def test_every_channel_is_kept_independently_with_ratio_sqrt_one_minus_p():
    # Both masks are slices of one draw: no channel may be biased or tied to another, within a
    # mask or across the two.
    p, n_keys, d_in, d_out = 0.5, 4000, 6, 5
    keys = jax.random.split(jax.random.key(4), n_keys)
    m_in, m_out = jax.jit(jax.vmap(lambda k: channel_masks(k, d_in, d_out, p)))(keys)
    assert m_in.shape == (n_keys, d_in) and m_out.shape == (n_keys, d_out)
    channels = np.concatenate([m_in, m_out], axis=1)  # [keys, d_in + d_out]
    q = np.sqrt(1 - p)
    assert np.abs(channels.mean(0) - q).max() < 5 * np.sqrt(q * (1 - q) / n_keys)
    corr = np.corrcoef(channels.T)[np.triu_indices(d_in + d_out, k=1)]
    assert np.abs(corr).max() < 5 / np.sqrt(n_keys)


def test_one_random_draw_per_mask_pair():
    # One threefry call per layer per forward pass: no key split, one bits draw (nested jaxprs
    # included in the printed program).
    program = str(jax.make_jaxpr(lambda k: channel_masks(k, D_IN, D_OUT, 0.3))(jax.random.key(0)))
    assert program.count("random_bits[") == 1 and "random_split" not in program


def test_mean_masked_output_equals_unmasked(factors):
    x, a, b = factors
    p, n_keys = 0.5, 4000
    keys = jax.random.split(jax.random.key(3), n_keys)

    def one(key):
        return masked_lora_delta(x, a, b, 1.0, channel_masks(key, D_IN, D_OUT, p), p)

    samples = np.asarray(jax.jit(jax.vmap(one))(keys))  # [keys, 3, D_OUT]
    mean = samples.mean(0)
    stderr = samples.std(0) / np.sqrt(n_keys)
    z = np.abs(mean - np.asarray(lora_delta(x, a, b, 1.0))) / stderr
    assert z.max() < 5.0


def test_without_rescale_the_mean_shrinks_by_keep_ratio(factors):
    x, a, b = factors
    masks = (jnp.ones(D_IN), jnp.ones(D_OUT))  # all kept: only the factor differs
    np.testing.assert_allclose(
        masked_lora_delta(x, a, b, 1.0, masks, 0.5, rescale=False), lora_delta(x, a, b, 1.0),
        rtol=1e-6)
    np.testing.assert_allclose(
        masked_lora_delta(x, a, b, 1.0, masks, 0.5), 2 * lora_delta(x, a, b, 1.0), rtol=1e-6)


def test_one_key_one_answer():
    m1 = channel_masks(jax.random.key(7), D_IN, D_OUT, 0.5)
    m2 = channel_masks(jax.random.key(7), D_IN, D_OUT, 0.5)
    m3 = channel_masks(jax.random.key(8), D_IN, D_OUT, 0.5)
    for u, v in zip(m1, m2, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(u, v) for u, v in zip(m1, m3, strict=True))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_p_outside_unit_interval_is_named(p):
    with pytest.raises(ConfigError, match=r"dropmerge_p must be in \[0, 1\)"):
        channel_masks(jax.random.key(0), 4, 4, p)
