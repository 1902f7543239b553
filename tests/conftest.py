"""Test-wide settings: 8 virtual CPU devices for sharding tests, fp32 matmuls, the data folder."""

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
