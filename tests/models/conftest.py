"""Helpers shared by the model tests, loaded by path (tests are not a package under
`--import-mode=importlib`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def load_sibling(name: str) -> ModuleType:
    """The module `tests/models/<name>.py`, loaded once per process."""
    key = f"slim_jax_tests_models_{name}"
    path = (Path(__file__).parent / f"{name}.py").resolve()
    for module in list(sys.modules.values()):  # already imported (e.g. by --doctest-modules)
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def sibling():
    """`load_sibling` as a fixture: `sibling("toy_family")`."""
    return load_sibling
