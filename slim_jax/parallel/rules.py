"""Logical-axis rules: which mesh axes split a dimension with a given logical name.

Every parameter names its dimensions in the variable metadata `logical_axes` (CONTRIBUTING.md):
a Llama `q_proj` kernel `[d_model, heads*head_dim]` carries `("embed", "heads")`. Rules map those
names onto the mesh axes `data`, `fsdp`, `tensor`, in the style of MaxText: an ordered list of
`(logical, mesh_axes)` pairs, where a logical name may appear several times as fallbacks.

For each dimension, left to right, the first rule for its name whose mesh axes are still unused by
this array and whose size divides the dimension is taken; if none fits, the dimension is
replicated. A mesh axis thus splits at most one dimension of an array, and a shape that does not
divide (a 172-wide MLP on 8 devices) degrades to replication instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from slim_jax.errors import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # frozen base: Megatron-style tensor parallelism plus FSDP over the model width
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("norm", None),
    ("rel_pos", None),
    # adapters: small, so their own axes stay whole; their d_in/d_out axes follow the base above
    ("lora_rank", None),
    ("experts", None),
    ("cluster", None),
)
"""The default rules. Adapter factors `A: [d_in, r]`, `B: [r, d_out]` carry the base layer's axis
names on `d_in` / `d_out`, so they are split exactly like the kernel they adapt."""


class ShardingRuleError(ConfigError):
    """A logical axis name has no rule, or a rule names an unknown mesh axis."""


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def check_rules(rules: Rules, mesh: Mesh | AbstractMesh) -> None:
    """Raise `ShardingRuleError` unless every rule maps a name onto axes of `mesh` (or None).

    >>> from jax.sharding import AbstractMesh
    >>> check_rules(DEFAULT_RULES, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")))
    """
    for entry in rules:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ShardingRuleError(
                f"sharding rule {entry!r} is not a (logical_name, mesh_axes) pair, e.g. "
                "('embed', 'fsdp') or ('batch', ('data', 'fsdp')) or ('norm', None)"
            )
        for axis in _as_tuple(entry[1]):
            if axis not in mesh.shape:
                raise ShardingRuleError(
                    f"sharding rule {entry!r} names mesh axis {axis!r}; the mesh has "
                    f"{tuple(mesh.shape)}"
                )


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Rules = DEFAULT_RULES,
    *,
    where: str = "array",
) -> PartitionSpec:
    """The `PartitionSpec` of an array of `shape` whose dimensions are named `logical_axes`.

    Args:
      logical_axes: one name (or None: replicated) per dimension.
      shape: the array's global shape; a dimension is only split by mesh axes whose size divides it.
      mesh: the device mesh (a `Mesh` or an `AbstractMesh`: only axis sizes are read).
      rules: `(logical_name, mesh_axes)` pairs, first match wins (see the module docstring).
      where: what the array is (a parameter path), for error messages.

    Raises:
      ShardingRuleError: when the number of names differs from the rank, or a name has no rule.

    >>> from jax.sharding import AbstractMesh
    >>> mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    >>> logical_to_spec(("embed", "mlp"), (64, 172), mesh)
    P('fsdp', 'tensor')
    >>> logical_to_spec(("embed", "mlp"), (64, 171), mesh)  # 171 is odd: replicate that dimension
    P('fsdp', None)
    """
    if len(logical_axes) != len(shape):
        raise ShardingRuleError(
            f"{where}: logical_axes {tuple(logical_axes)} name {len(logical_axes)} dimensions but "
            f"the array has shape {tuple(shape)}"
        )
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(logical_axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        candidates = [_as_tuple(axes) for logical, axes in rules if logical == name]
        if not candidates:
            known = sorted({logical for logical, _ in rules})
            raise ShardingRuleError(
                f"{where}: logical axis {name!r} has no sharding rule; rules name {known} "
                f"(add a rule such as ({name!r}, None) to replicate it)"
            )
        chosen: tuple[str, ...] = ()
        for axes in candidates:
            if used.isdisjoint(axes) and size % math.prod(mesh.shape[a] for a in axes) == 0:
                chosen = axes
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)
