"""benchmarks/profile_cpu.py: its HLO source-line categories and its trace reading. No timing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # profile_cpu imports harness from beside it
_spec = importlib.util.spec_from_file_location("benchmarks_profile_cpu", _BENCH / "profile_cpu.py")
profile_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_cpu)


def _attention_like(x):
    scores = x @ x.T
    probs = jax.nn.softmax(scores * 0.5, axis=-1)
    return probs @ x


def test_instructions_are_categorised_by_their_source_line():
    fn = jax.jit(_attention_like)
    x = jnp.ones((64, 32))
    categories = profile_cpu.hlo_categories(fn.lower(x).compile().as_text())
    softmax = [where for category, where in categories.values() if category == "softmax"]
    assert softmax and all("test_profile_cpu.py" in w and "softmax" in w for w in softmax)
    assert {c for c, _ in categories.values()} <= {
        "softmax", "other", "layout", *(c for c, _, _ in profile_cpu.CATEGORIES)}


def test_profile_charges_time_to_compiled_instructions():
    fn = jax.jit(_attention_like)
    x = jnp.ones((64, 32))
    categories = profile_cpu.hlo_categories(fn.lower(x).compile().as_text())
    totals = profile_cpu.profile(fn, (x,), repeats=2)
    assert any(name in categories for name in totals)  # the trace names the HLO instructions
