"""The device mesh: named axes `data`, `fsdp` and `tensor`, sized from a config.

`data` replicates the model and splits the batch; `fsdp` splits the batch and also the parameters
(the `embed` axis, ZeRO-3 style), so memory per device falls as it grows; `tensor` splits heads, MLP
width and vocabulary inside each layer (Megatron style). Their product must equal the number of
devices; one of them may be -1, meaning "whatever is left".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from slim_jax.errors import ConfigError

AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost first: `data` spans hosts, `tensor` stays within fast links."""


class MeshError(ConfigError):
    """The mesh shape does not fit the devices at hand."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; their product must be the device count.

    Attributes:
      data: pure data parallelism (replicated parameters).
      fsdp: data parallelism with parameters and optimiser state split along `embed`.
      tensor: tensor (model) parallelism over heads, MLP width and vocabulary.
      One of the three may be -1: it takes all devices the other two leave.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in AXES:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
                raise MeshError(f"must be a positive integer, or -1 for the devices the other "
                                f"axes leave; got {size!r}", field=name)
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1:
            raise MeshError(f"mesh sizes (data, fsdp, tensor) = {sizes}: at most one may be -1 "
                            "(take the remaining devices)")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete `(data, fsdp, tensor)` sizes for `num_devices` devices.

        >>> MeshConfig(data=-1, fsdp=2).shape(8)
        (4, 2, 1)
        """
        sizes = (self.data, self.fsdp, self.tensor)
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(
                    f"mesh (data, fsdp, tensor) = {sizes}: the fixed axes use {known} devices, "
                    f"which does not divide the {num_devices} devices available"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise MeshError(
                f"mesh (data, fsdp, tensor) = {sizes} needs {math.prod(sizes)} devices, but "
                f"{num_devices} are available: make the product equal {num_devices} or set "
                "one axis to -1"
            )
        return sizes  # type: ignore[return-value]


def make_mesh(
    config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A `Mesh` with axes `('data', 'fsdp', 'tensor')` over `devices` (default: all devices).

    Axes are `AxisType.Auto`: shardings are given to `jax.jit` as in/out shardings and the compiler
    propagates them through the step (the role `pjit` played), rather than typed per array.

    Args:
      config: the axis sizes.
      devices: the devices to lay out; all of `jax.devices()` by default (every process's devices
        when running multi-host).

    Raises:
      MeshError: when the sizes do not multiply to the number of devices.

    >>> mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    # jax.make_mesh orders devices by topology (ICI rings on TPU, NVLink islands on GPU).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_parallel_size(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> int:
    """How many ways the batch is split: the product of the batch mesh axes.

    >>> batch_parallel_size(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    1
    """
    return math.prod(mesh.shape[a] for a in batch_axes)
