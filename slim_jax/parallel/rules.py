"""Logical-axis rules: which mesh axes split a dimension with a given logical name.

Every parameter names its dimensions in the variable metadata `logical_axes` (CONTRIBUTING.md):
a Llama `q_proj` kernel `[d_model, heads*head_dim]` carries `("embed", "heads")`. Rules map those
names onto the mesh axes `data`, `fsdp`, `tensor`, in the style of MaxText: an ordered list of
`(logical, mesh_axes)` pairs, where a logical name may appear several times as fallbacks.

For each dimension, left to right, the first rule for its name whose mesh axes are still unused by
this array and whose size divides the dimension is taken; if none fits, the dimension is
replicated. Mesh axes of size 1 are dropped from every rule first (they split nothing), so a rule
that names only size-1 axes is skipped and the next one for that name applies. A mesh axis thus
splits at most one dimension of an array, and a shape that does not divide (a 172-wide MLP on 8
devices) degrades to replication instead of failing.

Then a mesh axis of size > 1 that no dimension took joins the first dimension (left to right)
that a rule for its name allows it to split and that it still divides. With the default rules a
base kernel `[embed, heads]` is split Megatron-style (`embed` on `fsdp`, `heads` on `tensor`),
while an adapter factor `B: [lora_rank, heads]`, whose other dimension takes no mesh axis, gets
`heads` split over `tensor` and `fsdp` both; on a mesh without tensor parallelism (`tensor=1`,
the pod presets) `heads`, `kv_heads`, `mlp` and `vocab` fall back to `fsdp`. So no array is
replicated across a mesh axis of size > 1 that its rules let split it. (`data` only splits the
batch: parameters are replicated across it by design, and `lora_rank` has no rule, so a LoRA `A:
[embed, r]` is replicated across `tensor`, as its Megatron input is.)
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
    # frozen base: Megatron-style tensor parallelism plus FSDP over the model width; the
    # fallbacks (see the module docstring) let adapters and tensor=1 meshes use fsdp too
    ("vocab", "tensor"),
    ("vocab", "fsdp"),
    ("heads", "tensor"),
    ("heads", "fsdp"),
    ("kv_heads", "tensor"),
    ("kv_heads", "fsdp"),
    ("mlp", "tensor"),
    ("mlp", "fsdp"),
    ("embed", "fsdp"),
    ("norm", None),
    ("rel_pos", None),
    ("layers", None),  # the stacked axis of a scanned model (slim_jax.nn.stack): never split
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
    >>> logical_to_spec(("lora_rank", "mlp"), (4, 64), mesh)  # an adapter B: tensor and fsdp
    P(None, ('tensor', 'fsdp'))
    >>> pod = AbstractMesh((1, 64, 1), ("data", "fsdp", "tensor"))  # tensor=1: fall back to fsdp
    >>> logical_to_spec(("lora_rank", "heads"), (16, 4096), pod)
    P(None, 'fsdp')
    """
    if len(logical_axes) != len(shape):
        raise ShardingRuleError(
            f"{where}: logical_axes {tuple(logical_axes)} name {len(logical_axes)} dimensions but "
            f"the array has shape {tuple(shape)}"
        )
    used: set[str] = set()
    spec: list[tuple[str, ...]] = []
    for name, size in zip(logical_axes, shape, strict=True):
        if name is None:
            spec.append(())
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
            axes = tuple(a for a in axes if mesh.shape[a] > 1)  # size-1 axes split nothing
            ways = math.prod(mesh.shape[a] for a in axes)
            if axes and used.isdisjoint(axes) and size % ways == 0:
                chosen = axes
                break
        used.update(chosen)
        spec.append(chosen)
    for axis in mesh.axis_names:  # fill: an axis no dimension took joins one its rules allow
        if mesh.shape[axis] == 1 or axis in used:
            continue
        for i, (name, size) in enumerate(zip(logical_axes, shape, strict=True)):
            allowed = any(axis in _as_tuple(axes) for logical, axes in rules if logical == name)
            split = math.prod(mesh.shape[a] for a in spec[i]) * mesh.shape[axis]
            if name is not None and allowed and size % split == 0:
                spec[i] = (*spec[i], axis)
                used.add(axis)
                break
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes
                           for axes in spec))
