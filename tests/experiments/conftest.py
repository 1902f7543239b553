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
