"""Fixtures of the experiment tests that run commands as processes: the `processes` helper
module (see processes.py), their environment, and data arguments with one compilation cache per
test module."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest


def load_processes() -> ModuleType:
    """Import tests/experiments/processes.py once (tests are imported by path, not as a
    package)."""
    if "slim_jax_tests_processes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("slim_jax_tests_processes",
                                                      Path(__file__).with_name("processes.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["slim_jax_tests_processes"]


@pytest.fixture(scope="session")
def processes() -> ModuleType:
    return load_processes()


@pytest.fixture(scope="module")
def process_env(processes, quick_compile) -> dict[str, str]:
    """The commands' environment: this checkout first on the path, one CPU device, quick
    compilation (see `quick_compile`)."""
    return {**os.environ, "PYTHONPATH": str(processes.REPO), "XLA_FLAGS": "",
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def data_args(shared_data, tmp_path_factory) -> list[str]:
    """`--data-dir` and one `--compilation-cache` for every run of a test module (reruns compile
    nothing; the compiled programs, hence the numbers, are the same)."""
    cache = tmp_path_factory.mktemp("xla")
    return ["--data-dir", str(shared_data), "--compilation-cache", str(cache)]


@pytest.fixture(scope="session")
def write_peft_modules(shared_data):
    """`write(root, tasks, ranks=4, random_b=True)`: one PEFT LoRA module per task in `root/<task>`
    on q/v of the TinyStories model (rank r, alpha 2r); with `random_b` the B factors are drawn
    (`np.random.default_rng(0)` over the tasks in order), so the composition weights matter."""
    import numpy as np
    from flax import nnx

    from slim_jax.models.llama2c import load_llama2c
    from slim_jax.models.peft_io import save_peft
    from slim_jax.nn import LoRAConfig, adapted_layers, inject

    folder = shared_data / "tinystories260k"

    def write(root: Path, tasks, ranks=4, random_b: bool = True) -> Path:
        rng = np.random.default_rng(0)
        ranks = [ranks] * len(tasks) if isinstance(ranks, int) else ranks
        for task, rank in zip(tasks, ranks, strict=True):
            model, _ = load_llama2c(folder / "checkpoint_v1.bin")
            inject(model, "(q|v)_proj$", LoRAConfig(rank=rank, alpha=2.0 * rank),
                   rngs=nnx.Rngs(0))
            if random_b:
                for layer in adapted_layers(model).values():
                    layer.lora_b.set_value(
                        0.1 * rng.standard_normal(layer.lora_b.shape, np.float32))
            save_peft(model, root / task, base_model_name_or_path=str(folder))
        return root

    return write
