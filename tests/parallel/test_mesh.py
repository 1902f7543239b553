"""The mesh from config: sizes, the -1 wildcard, and named errors for what does not fit."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AxisType

from slim_jax.errors import ConfigError
from slim_jax.parallel import AXES, MeshConfig, MeshError, batch_parallel_size, make_mesh


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (MeshConfig(), (8, 1, 1)),
        (MeshConfig(data=2, fsdp=4), (2, 4, 1)),
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
    ],
)
def test_mesh_shapes_over_eight_devices(config, shape):
    mesh = make_mesh(config)
    assert mesh.axis_names == AXES
    assert tuple(mesh.shape[a] for a in AXES) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert batch_parallel_size(mesh) == shape[0] * shape[1]


def test_mesh_on_a_subset_of_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), devices=jax.devices()[4:])
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[4:]}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (MeshConfig(data=3), r"needs 3 devices, but 8 are available"),
        (MeshConfig(data=2, fsdp=2, tensor=4), r"needs 16 devices, but 8"),
        (MeshConfig(data=-1, fsdp=3), r"fixed axes use 3 devices, which does not divide the 8"),
    ],
)
def test_mesh_that_does_not_fit_is_named(config, message):
    with pytest.raises(MeshError, match=message) as err:
        make_mesh(config)
    assert isinstance(err.value, ConfigError)


@pytest.mark.parametrize(
    ("sizes", "message", "field"),
    [
        ({"data": -1, "fsdp": -1}, r"at most one may be -1", None),
        ({"data": 0}, r"^data must be a positive integer, or -1", "data"),
        ({"tensor": -2}, r"^tensor must be a positive integer", "tensor"),
    ],
)
def test_invalid_sizes_are_refused_when_the_config_is_made(sizes, message, field):
    with pytest.raises(MeshError, match=message) as err:
        MeshConfig(**sizes)
    assert err.value.field == field
