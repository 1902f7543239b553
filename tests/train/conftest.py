"""Fixtures of the training tests: the `tiny` helper module (see tiny.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_tiny():
    """Import tests/train/tiny.py once (tests are imported by path, not as a package)."""
    if "slim_jax_tests_tiny" not in sys.modules:
        spec = importlib.util.spec_from_file_location("slim_jax_tests_tiny",
                                                      Path(__file__).with_name("tiny.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["slim_jax_tests_tiny"]


@pytest.fixture(scope="session")
def tiny():
    return load_tiny()
