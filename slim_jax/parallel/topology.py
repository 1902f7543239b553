"""Accelerator topologies by name (`v5e-16`, `v4-32`, `cpu-8`): their devices, HBM and peak FLOP/s.

A TPU topology's devices come from `jax.experimental.topologies.get_topology_desc`, which needs
`libtpu` (the `tpu` extra: `pip install -e ".[tpu]"`) but no TPU: a program lowered for them with
`jax.jit(f).lower(...).compile()` is compiled for that chip and that mesh on any host, so its
memory and FLOPs per chip are measured before renting the pod (`slim_jax.train.aot`). Names
follow Cloud TPU (`v5e-16`: 16 chips; `v4-32`, `v5p-64`: 32 and 64 TensorCores, that is 16 and
32 chips); `cpu-N` is N host devices of this machine (set
`XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX starts).

The chip layouts are MaxText's `accelerator_to_spec_map.py`; HBM per chip and peak bf16 FLOP/s
are Google's data sheets (peak FLOP/s: `peak_flops_per_device`).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
from jax.experimental import topologies

from slim_jax.errors import ConfigError

# Peak dense bf16 FLOP/s per device (chip), by `jax.Device.device_kind` prefix, from the vendors'
# data sheets. Longest prefixes first so "TPU v5 lite" is not read as "TPU v5".
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first device), or None when unknown (CPU).

    >>> peak_flops_per_device(jax.devices("cpu")[0]) is None
    True
    """
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None


GIB = 1024**3
# libtpu takes a lock file so that one process owns the local TPU; compiling for a topology
# description owns no chip, so several such processes (tests, other users) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


class TopologyError(ConfigError):
    """An unknown topology name, or one that cannot be built on this host."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation: the topology prefix, chip config and HBM per chip."""

    prefix: str  # get_topology_desc's name prefix, e.g. "v5e"
    chip_config: str  # "default" (one TensorCore per chip) or "megacore" (two act as one)
    hbm_bytes: int


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "megacore", 32 * GIB),
    "v5e": Chip("v5e", "default", 16 * GIB),
    "v5p": Chip("v5", "megacore", 95 * GIB),
    "v6e": Chip("v6e", "default", 32 * GIB),
}
# Cores per chip in the Cloud TPU name: v4-32 and v5p-64 count TensorCores (two per chip).
_CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
# Chip grid of each size, from MaxText's map (x*y for 2-D generations, x*y*z for 3-D ones).
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named set of devices to compile for.

    Attributes:
      name: as given (`v5e-16`, `cpu-8`).
      devices: the devices (TPU topology devices, or this host's CPU devices).
      hbm_bytes: memory per device (for CPU: host memory divided among the devices).
      peak_flops: peak bf16 FLOP/s per device; None where unknown (CPU).
    """

    name: str
    devices: tuple[jax.Device, ...]
    hbm_bytes: int
    peak_flops: float | None

    @property
    def device_kind(self) -> str:
        """What each device is, e.g. `TPU v5 lite`."""
        return self.devices[0].device_kind


def _grid(generation: str, chips: int) -> tuple[str, tuple[bool, bool, bool]]:
    grids = _GRIDS_3D if generation in ("v4", "v5p") else _GRIDS_2D
    if chips not in grids:
        sizes = sorted(n * _CORES_PER_CHIP[generation] for n in grids)
        raise TopologyError(f"no {generation} slice of {chips} chips is known; sizes: "
                            + ", ".join(f"{generation}-{n}" for n in sizes))
    # Slices of a full torus dimension wrap around (MaxText: from 64 chips on 3-D, 128 on 2-D).
    if generation in ("v4", "v5p"):
        wrap = (True, True, True) if chips >= 64 else (False, False, False)
    else:
        wrap = {128: (False, True, False), 256: (True, True, False)}.get(
            chips, (False, False, False))
    return grids[chips], wrap


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def topology(name: str) -> Topology:
    """The devices and per-device limits of the topology `name`.

    Args:
      name: `v4-N`, `v5e-N`, `v5p-N`, `v6e-N` (Cloud TPU names) or `cpu-N` (N host devices).

    Raises:
      TopologyError: an unknown name, `libtpu` not installed, or fewer than N host devices.

    >>> topology("cpu-1").devices[0].platform
    'cpu'
    >>> topology("v5e-16").hbm_bytes // GIB, len(topology("v5e-16").devices)  # needs libtpu
    (16, 16)
    """
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)-(\d+)", name)
    if match is None:
        raise TopologyError(f"unknown topology {name!r}: use e.g. v4-32, v5e-16, v5e-256, "
                            "v5p-64, v6e-16, or cpu-8 for 8 host devices")
    generation, count = match.group(1), int(match.group(2))
    if generation == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise TopologyError(
                f"{name} needs {count} host devices but JAX has {len(devices)}: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before it starts")
        return Topology(name, tuple(devices[:count]), _host_memory_bytes() // count, None)
    cores = _CORES_PER_CHIP[generation]
    if count % cores:
        raise TopologyError(f"{name}: {generation} names count TensorCores, {cores} per chip; "
                            f"use a multiple of {cores}")
    chip = CHIPS[generation]
    grid, wrap = _grid(generation, count // cores)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{chip.prefix}:{grid}",
            chip_config_name=chip.chip_config, chips_per_host_bounds=(2, 2, 1), num_slices=1,
            wrap=wrap)
    except (RuntimeError, ValueError) as err:
        raise TopologyError(
            f"cannot describe TPU topology {name} ({chip.prefix}:{grid}): {str(err)[:200]}; "
            "compiling for a TPU needs libtpu: pip install -e '.[tpu]'") from err
    devices = tuple(desc.devices)
    return Topology(name, devices, chip.hbm_bytes, peak_flops_per_device(devices[0]))
