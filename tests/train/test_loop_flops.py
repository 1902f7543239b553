"""Loops counted as they run: a scanned program's FLOPs equal its unrolled twin's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from slim_jax.train.loop_flops import loop_flops

X, WS = jnp.ones((16, 32)), jnp.ones((5, 32, 32))


def _scanned(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0].sum()


def _unrolled(x, ws):
    for w in ws:
        x = jnp.tanh(x @ w)
    return x.sum()


def _count(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return loop_flops(compiled.as_text(), compiled.cost_analysis()["flops"])


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_a_scanned_program_counts_as_its_unrolled_twin(grad):
    wrap = (lambda fn: jax.grad(fn, 1)) if grad else (lambda fn: fn)
    scanned, unrolled = _count(wrap(_scanned), X, WS), _count(wrap(_unrolled), X, WS)
    assert scanned.trip_counts == ((5, 5) if grad else (5,)) and scanned.exact
    assert scanned.reported < 0.5 * scanned.flops  # XLA alone: one of the five bodies
    assert unrolled.trip_counts == () and unrolled.flops == unrolled.reported
    # The scanned gradient also computes the first layer's unused input gradient: a few % more.
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.1 if grad else 0.01)


def test_nested_loops_multiply():
    def nested(x, ws):
        def outer(c, _):
            return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), c, ws)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0].sum()

    r = _count(nested, X, WS)
    assert sorted(r.trip_counts) == [3, 5] and r.exact
    assert r.flops == pytest.approx(3 * _count(_unrolled, X, WS).flops, rel=0.02)


def test_a_loop_that_stops_on_data_is_counted_once_and_flagged():
    def until_small(x, w):
        return jax.lax.while_loop(lambda c: c.sum() > 1.0, lambda c: jnp.tanh(c @ w) * 0.5, x)

    r = _count(until_small, X, WS[0])
    assert r.trip_counts == (None,) and not r.exact and r.flops == r.reported
    assert r.count == "at least"


def _count_on_tpu(fn, *args):
    """`fn` compiled for one v5e chip: the TPU program keeps a loop's condition unfused."""
    pytest.importorskip("libtpu")
    from jax.sharding import NamedSharding, PartitionSpec

    from slim_jax.parallel import MeshConfig, make_mesh
    from slim_jax.parallel.topology import topology

    mesh = make_mesh(MeshConfig(data=1), topology("v5e-4").devices[:1])
    on = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on) for a in args]
    compiled = jax.jit(fn).lower(*args).compile()
    return loop_flops(compiled.as_text(), compiled.cost_analysis()["flops"])


def test_a_fori_loop_carrying_its_bound_counts_on_tpu():
    # lax.fori_loop carries its upper bound through the loop: the TPU program's condition is
    # `i < carried n`, with n set before the loop (the CPU compiler annotates the count).
    def fori(x, w):
        return jax.lax.fori_loop(0, 6, lambda i, c: jnp.tanh(c @ w), x).sum()

    r = _count_on_tpu(fori, X, WS[0])
    assert r.trip_counts == (6,) and r.flops >= 6 * 2 * 16 * 32 * 32 > r.reported


def test_a_bounded_loop_that_may_stop_early_is_counted_to_its_bound_on_tpu():
    # Greedy decoding's form, `t < n & ~all(done)`, t from 1: the count is the most it runs.
    def decode(x, w):
        def cond(state):
            t, c = state
            return (t < 7) & (c.sum() > 1.0)

        return jax.lax.while_loop(cond, lambda s: (s[0] + 1, jnp.tanh(s[1] @ w)), (1, x))[1]

    r = _count_on_tpu(decode, X, WS[0])
    assert r.trip_counts == (6,) and r.stops_early == (True,) and r.count == "at most"
    assert not r.exact and r.flops >= 6 * 2 * 16 * 32 * 32 > r.reported
