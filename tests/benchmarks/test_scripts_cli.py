"""The benchmark scripts keep their command lines (no timing, nothing run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # the scripts import harness from beside them


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_keeps_steps_as_the_rounds_and_has_the_one_core_mode():
    args = _script("train_step").parse_args(["--steps", "3", "--threads", "1"])
    assert (args.repeats, args.threads, args.allow_busy) == (3, 1, False)


def test_model_forward_defaults_and_t5_config():
    module = _script("model_forward")
    default = module.parse_args([])
    assert (default.model, default.hidden, default.layers, default.batch, default.seq) == (
        "llama", 256, 4, 4, 256)
    assert module.parse_args(["--model", "t5"]).model == "t5"
    with pytest.raises(SystemExit):
        module.parse_args(["--model", "gpt"])


def test_attention_forms_agree_with_the_current_einsum():
    import jax
    import numpy as np

    module = _script("attention_forms")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 4, 4), np.float32)
    k, v = (rng.standard_normal((1, 8, 2, 4), np.float32) for _ in range(2))
    mask = np.tril(np.ones((8, 8), bool))[None]
    ref = np.asarray(jax.jit(module.einsum_form)(q, k, v, mask))
    for form in (module.bhsd_form, module.dpa_form, module.blocked_form(3), module.library_form):
        np.testing.assert_allclose(np.asarray(jax.jit(form)(q, k, v, mask)), ref, atol=1e-5)


def test_generation_memory_roof_counts_every_weight_byte(monkeypatch):
    import argparse

    from flax import nnx

    module = _script("model_forward")
    monkeypatch.setattr(module.harness, "read_bandwidth", lambda: 1000.0)  # bytes/s
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))  # 16 + 4 float32 parameters: 80 bytes
    bound = module.generation_bound(model, argparse.Namespace(batch=8))
    assert bound["weight_bytes"] == 80 and bound["max_tok_s"] == 8 * 1000.0 / 80
    assert bound["line"].startswith("generation memory roof: 0.0 MiB of weights")
