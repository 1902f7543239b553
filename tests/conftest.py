"""Test-wide settings: 8 virtual CPU devices for sharding tests, fp32 matmuls, the data folder,
quick compilation for the modules that opt in."""

from __future__ import annotations

import os

# Must be set before jax initialises its backends: every test sees 8 CPU devices, so sharded code
# is exercised on a plain CPU machine. Single-device code simply uses device 0.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With jax[tpu] installed (libtpu, for compile-only tests of TPU topologies) JAX would first try
# to start a TPU backend: the tests run on the CPU; TPU topologies are described, never run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_data():
    """The local data folder (`$SLIM_JAX_DATA_DIR`). CI sets it; a local run without it skips."""
    from slim_jax.errors import DataError
    from slim_jax.settings import data_dir

    try:
        return data_dir()
    except DataError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"needs the shared data: {err}")


@pytest.fixture(scope="module")
def quick_compile():
    """JAX's `jax_disable_most_optimizations` (XLA's LLVM at -O0, no expensive passes) for one
    test module, in this process and, through its environment variable, in the processes it
    starts; restored after the module. For modules bound by compiling many small programs (opt in
    with `pytestmark = pytest.mark.usefixtures("quick_compile")`): compiling costs a third to half
    less. Results agree with the default build to float rounding (~1e-7), and a test compares
    only programs built the same way."""
    previous = jax.config.read("jax_disable_most_optimizations")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            yield
        finally:
            jax.config.update("jax_disable_most_optimizations", previous)
