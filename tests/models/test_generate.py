"""Decoder generation: bucketing, padding, per-row stopping, sampling settings, and one compiled
program per bucket (no recompilation per token, per prompt length or per batch size in a bucket)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models import generate as gen
from slim_jax.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

VOCAB = 32


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=4, num_kv_heads=2, eos_ids=(2,), pad_id=0)
    return Llama(cfg, rngs=nnx.Rngs(0))


@contextlib.contextmanager
def count_compilations():
    """Counts jaxpr traces of the generation program and all backend compilations inside."""
    from jax._src import dispatch

    counts = {"traces": 0, "compiles": 0}

    def listener(event, duration, **kwargs):
        if event == dispatch.JAXPR_TRACE_EVENT and kwargs.get("fun_name") == "generation_program":
            counts["traces"] += 1
        if event == dispatch.BACKEND_COMPILE_EVENT:
            counts["compiles"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_one_program_per_bucket(model):
    with count_compilations() as counts:
        first = gen.generate(model, [[1, 5, 6], [1, 7]], max_new_tokens=12, stop_ids=())
    assert counts["traces"] == 1  # the 12 steps ran inside one traced program
    with count_compilations() as counts:
        # Other prompt lengths, same 16-slot bucket: nothing is traced or compiled again.
        gen.generate(model, [[1, 9, 9, 9, 9, 9, 9], [1, 3]], max_new_tokens=12, stop_ids=())
    assert counts == {"traces": 0, "compiles": 0}
    gen.generate(model, [[1], [1, 2], [1, 3]], max_new_tokens=12, stop_ids=())
    with count_compilations() as counts:  # 3 and 4 rows share the 4-row bucket
        again = gen.generate(model, [[1, 5, 6], [1, 7], [1, 4], [1, 8, 8]], max_new_tokens=12,
                             stop_ids=())
    assert counts == {"traces": 0, "compiles": 0}
    assert again.tokens[:2] == first.tokens  # padding rows and lengths do not change results
    assert [len(row) for row in first.tokens] == [12, 12]


def test_stops_per_row_at_stop_ids(model):
    free = gen.generate(model, [[1, 5, 6], [1, 7]], max_new_tokens=12, stop_ids=())
    stop = free.tokens[0][3]
    stopped = gen.generate(model, [[1, 5, 6], [1, 7]], max_new_tokens=12, stop_ids=(stop,))
    for row, full in zip(stopped.tokens, free.tokens, strict=True):
        assert row == (full[:full.index(stop)] if stop in full else full)
    assert stopped.texts is None


def test_decode_loop_pads_finished_rows_and_exits_early():
    # A toy "model" whose next token is the previous one + 1; the stop id is 7. Its carry counts
    # the steps run, and comes back from the loop.
    def step(carry, previous):
        return jax.nn.one_hot(previous + 1, 8) * 10.0, carry + 1

    @jax.jit
    def run(first_tokens):
        first = jax.nn.one_hot(first_tokens, 8) * 10.0
        return gen.decode_loop(step, jnp.int32(0), first, key=jax.random.key(0),
                               max_new_tokens=6, temperature=0.0, top_p=1.0, stop_ids=(7,),
                               pad_id=0)

    out, steps = run(jnp.array([1, 5]))
    np.testing.assert_array_equal(out, [[1, 2, 3, 4, 5, 6], [5, 6, 7, 0, 0, 0]])
    assert gen.trim_at_stop(np.asarray(out), (7,)) == [[1, 2, 3, 4, 5, 6], [5, 6]]
    assert int(steps) == 5  # one step per token after the first
    out, steps = run(jnp.array([5, 6]))
    np.testing.assert_array_equal(out, [[5, 6, 7, 0, 0, 0], [6, 7, 0, 0, 0, 0]])
    assert int(steps) == 2  # the loop ends when both rows have stopped, not after 6 tokens


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy(model):
    prompts = [[1, 5, 6], [1, 7]]
    kwargs = dict(max_new_tokens=12, stop_ids=(), temperature=1.0)
    a = gen.generate(model, prompts, key=jax.random.key(3), **kwargs)
    b = gen.generate(model, prompts, key=jax.random.key(3), **kwargs)
    c = gen.generate(model, prompts, key=jax.random.key(4), **kwargs)
    assert a.tokens == b.tokens != c.tokens
    greedy = gen.generate(model, prompts, max_new_tokens=12, stop_ids=())
    nucleus = gen.generate(model, prompts, key=jax.random.key(5), max_new_tokens=12, stop_ids=(),
                           temperature=1.0, top_p=1e-6)
    assert nucleus.tokens == greedy.tokens


def test_bucket_and_pad_helpers():
    assert [gen.bucket_length(n) for n in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
    tokens, segments = gen.pad_batch([[5, 6], [7]], length=4, pad_id=9, side="right", batch=3)
    np.testing.assert_array_equal(tokens, [[5, 6, 9, 9], [7, 9, 9, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(segments, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ConfigError, match="row 1 has 3 tokens, more than the padded length 2"):
        gen.pad_batch([[1], [1, 2, 3]], length=2, pad_id=0)
    with pytest.raises(ConfigError, match="batch=1 is smaller than the 2 rows"):
        gen.pad_batch([[1], [2]], length=2, pad_id=0, batch=1)
    with pytest.raises(ConfigError, match="side must be 'left' or 'right'"):
        gen.pad_batch([[1]], length=2, pad_id=0, side="middle")


@pytest.mark.parametrize(("prompts", "kwargs", "message"), [
    (["hello"], {}, "text prompts need a tokenizer"),
    ("hello", {}, "wrap a single prompt as"),
    ([], {}, "at least one prompt"),
    ([[1], []], {}, "prompt 1 is empty and there is no BOS"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([[1]], {"temperature": 0.7}, "needs a PRNG key"),
    ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
])
def test_bad_input_is_named(model, prompts, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        gen.generate(model, prompts, **kwargs)
