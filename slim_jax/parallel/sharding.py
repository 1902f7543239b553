"""Shardings of NNX state, optimiser state and batches, and placing them on the mesh.

A variable's sharding comes from its `logical_axes` metadata through the rules; a variable without
it (and any bare array, such as an optimiser step count) is replicated. Optimiser states built by
optax over an `nnx.State` hold `nnx.Variable`s that keep their parameter's metadata, so the moments
of AdamW are split exactly like the parameters they track, with no extra bookkeeping.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from slim_jax.errors import ConfigError
from slim_jax.parallel.mesh import batch_parallel_size
from slim_jax.parallel.rules import DEFAULT_RULES, MeshAxes, Rules, check_rules, logical_to_spec

T = TypeVar("T")
M = TypeVar("M", bound=nnx.Module)

LOGICAL_AXES = "logical_axes"
"""The variable metadata key that holds a parameter's per-dimension logical names."""


class BatchSizeError(ConfigError):
    """The global batch cannot be split evenly over the batch mesh axes (or micro-batches)."""


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def tree_shardings(tree: T, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> T:
    """A tree of `NamedSharding`s with the structure of `tree`.

    Args:
      tree: any pytree; `nnx.Variable` leaves are sharded by their `logical_axes` metadata,
        arrays (and variables without that metadata) are replicated.
      mesh: the device mesh.
      rules: logical-axis rules (`slim_jax.parallel.rules`).

    Returns:
      The same structure, each array leaf (or Variable value) replaced by its `NamedSharding`;
      usable as `in_shardings` / `out_shardings` of `jax.jit` and as a `jax.device_put` target.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    >>> state = {"w": nnx.Param(jnp.zeros((16, 4)), logical_axes=("embed", "lora_rank"))}
    >>> tree_shardings(state, mesh)["w"].get_value().spec
    P('fsdp', None)
    """
    check_rules(rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> Any:
        if _is_variable(leaf):
            value = leaf.get_value()
            if value is None:  # an empty slot (e.g. a token mask between calls): no array
                return leaf
            names = leaf.get_metadata().get(LOGICAL_AXES)
            if names is None or not hasattr(value, "shape"):
                return leaf.replace(replicated)
            spec = logical_to_spec(names, value.shape, mesh, rules, where=_path_str(path))
            return leaf.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree, is_leaf=_is_variable)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """One array onto a sharding that spans other processes' devices too: every process holds
    the full value and writes only the shards its own devices own."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), NamedSharding(sharding.mesh, sharding.spec))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard(tree: T, shardings: Any) -> T:
    """`tree` placed on devices as `shardings` (a matching tree of `NamedSharding`s) says.

    With one process this is `jax.device_put`. With several, every process must hold the same
    full values (a checkpoint each process loaded, a model each built from the same seed); each
    then places only the shards its own devices own.

    >>> import jax, jax.numpy as jnp
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=-1))
    >>> x = shard(jnp.zeros((8, 2)), NamedSharding(mesh, PartitionSpec("data")))
    >>> x.sharding.spec
    P('data',)
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(_put_global, tree, shardings)


def shard_module(module: M, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> M:
    """Place every variable of `module` on `mesh` by its logical axes, in place; returns `module`.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    >>> layer = nnx.Linear(16, 8, rngs=nnx.Rngs(0),
    ...                    kernel_metadata={"logical_axes": ("embed", "mlp")})
    >>> kernel = shard_module(layer, mesh).kernel.get_value()  # d_in split over every device
    >>> kernel.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("fsdp", None)), 2)
    True
    """
    state = nnx.state(module)
    nnx.update(module, shard(state, tree_shardings(state, mesh, rules)))
    return module


def create_sharded(create: Callable[[], M], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> M:
    """Build the module `create()` returns directly in its sharded layout.

    Initialisation runs under `jax.jit` with the target shardings as outputs, so no device ever
    holds the whole model: the way to initialise a model larger than one device's memory.

    >>> import jax
    >>> from flax import nnx
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    >>> make = lambda: nnx.Linear(16, 8, rngs=nnx.Rngs(0),
    ...                           kernel_metadata={"logical_axes": ("embed", "mlp")})
    >>> create_sharded(make, mesh, rules=(("embed", "fsdp"), ("mlp", None))).kernel.shape
    (16, 8)
    """
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = tree_shardings(abstract_state, mesh, rules)
    init = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)
    return nnx.merge(graphdef, init())


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("activation_rules",
                                                                     default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """`jax.set_mesh(mesh)` together with the logical-axis rules of the activation constraints
    (`constrain`) traced inside it: the run's rules (`TrainConfig.rules`) reach the model's
    constraints as its mesh does. `rules` None keeps the rules of an enclosing context (else
    `DEFAULT_RULES`).

    Enter it outside `jax.jit`, around the call that traces (the Trainer's step does,
    `slim_jax.train.step.MeshJit`). A jitted function's cache is keyed by the mesh, not by
    the rules: call one jitted function under one set of rules.

    >>> import jax, jax.numpy as jnp
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=-1))
    >>> with mesh_context(mesh, (("batch", None), ("embed", "data"))):  # embed split, not batch
    ...     y = jax.jit(lambda x: constrain(2 * x, ("batch", "embed")))(jnp.ones((8, 8)))
    >>> y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "data")), 2)
    True
    """
    with jax.set_mesh(mesh), activation_rules(rules):
        yield mesh


@contextlib.contextmanager
def activation_rules(rules: Rules | None) -> Iterator[Rules]:
    """The rules of the activation constraints (`constrain`) traced inside (None: keep those
    already set); unlike `mesh_context`, this may be entered inside a traced function, so a
    jitted function can take its rules as a static argument (then its cache is keyed by them)."""
    token = _RULES.set(rules if rules is not None else _RULES.get())
    try:
        yield current_rules()
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The rules of the enclosing `mesh_context` / `activation_rules`, else `DEFAULT_RULES`."""
    return _RULES.get() or DEFAULT_RULES


def model_mesh(tree: Any) -> Mesh | None:
    """The mesh `tree`'s arrays are laid out on (the first `NamedSharding` over more than one
    device), or None: unsharded, abstract or traced values."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) and not \
            isinstance(leaf, jax.core.Tracer) else None
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def constrain(
    x: jax.Array,
    logical_axes: tuple[str | None, ...],
    rules: Rules | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> jax.Array:
    """`x` constrained to the sharding its dimensions' logical names give (an activation).

    For the places where XLA's propagation picks badly inside a step, e.g. attention scores
    `("batch", "heads", None, None)`: batch on the batch axes, heads on `tensor`. The mesh is
    `mesh`, else the one set around the computation (`mesh_context(mesh, rules)` around the call
    that traces it: compile-only runs and the Trainer's step do); with neither, or inside
    `shard_map` (manual axes), `x` is returned as it is, so models may call this whether or not
    they run sharded.

    Args:
      x: the array, inside a traced function.
      logical_axes: one logical name (or None) per dimension of `x`.
      rules: logical-axis rules; default those of the enclosing `mesh_context`, else
        `DEFAULT_RULES`.
      mesh: the device mesh; default the ambient one.

    >>> import jax, jax.numpy as jnp
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=-1))
    >>> with jax.set_mesh(mesh):
    ...     y = jax.jit(lambda x: constrain(2 * x, ("batch", "embed")))(jnp.ones((8, 4)))
    >>> y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("data", None)), 2)
    True
    >>> constrain(jnp.ones((8, 4)), ("batch", "embed")).shape  # no mesh: unchanged
    (8, 4)
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    if any(kind == AxisType.Manual for kind in mesh.axis_types):
        return x  # inside shard_map (e.g. LoRAHub's population split): the caller shards by hand
    rules = rules if rules is not None else current_rules()
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules, where="activation")
    target = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, target)


def batch_axes(rules: Rules = DEFAULT_RULES) -> MeshAxes:
    """The mesh axes the rules give the logical `batch` axis (the first `batch` rule).

    >>> batch_axes()
    ('data', 'fsdp')
    """
    for logical, axes in rules:
        if logical == "batch":
            return axes
    raise ConfigError("the sharding rules have no 'batch' rule, e.g. ('batch', ('data', 'fsdp'))")


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a `[batch, ...]` array of rank `ndim`: dimension 0 split over the batch axes.

    >>> import jax
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> batch_sharding(make_mesh(MeshConfig(data=-1)), 2).spec
    P(('data', 'fsdp'), None)
    """
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules), *([None] * (ndim - 1))))


def check_global_batch(
    global_batch_size: int, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, micro_steps: int = 1
) -> None:
    """Raise `BatchSizeError` unless the batch splits evenly over devices and micro-batches.

    Each of the `micro_steps` micro-batches (gradient accumulation) is split over the batch mesh
    axes, so `global_batch_size` must be a multiple of `micro_steps * batch-parallel size`, and of
    the process count (each process feeds an equal slice).

    >>> import jax
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    >>> check_global_batch(16, mesh, micro_steps=2)
    >>> check_global_batch(15, mesh, micro_steps=2)
    Traceback (most recent call last):
    ...
    slim_jax.parallel.sharding.BatchSizeError: global batch size 15 is not divisible by ...
    """
    axes = batch_axes(rules)
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = batch_parallel_size(mesh, names)
    if global_batch_size <= 0 or global_batch_size % (ways * micro_steps):
        raise BatchSizeError(
            f"global batch size {global_batch_size} is not divisible by the {ways} batch shards "
            f"(mesh axes {names} of sizes {[mesh.shape[a] for a in names]}) times the "
            f"{micro_steps} gradient-accumulation micro-steps: use a multiple of "
            f"{ways * micro_steps}"
        )
    processes = jax.process_count()
    if global_batch_size % processes:
        raise BatchSizeError(
            f"global batch size {global_batch_size} is not divisible by the {processes} processes "
            "that each feed an equal slice"
        )


def global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[str, jax.Array]:
    """Assemble the global, batch-sharded arrays from this process's slice of the batch.

    Each of the `jax.process_count()` processes passes its own `[global_batch / process_count, ...]`
    rows (in process order); with one process the local batch is the global batch.

    Args:
      local_batch: `{key: [local_batch, ...]}` host arrays (the standard batch keys).
      mesh: the device mesh.
      rules: logical-axis rules (for the `batch` axis).

    Raises:
      BatchSizeError: when the global batch does not split over the batch axes.

    >>> import jax, numpy as np
    >>> from slim_jax.parallel.mesh import MeshConfig, make_mesh
    >>> mesh = make_mesh(MeshConfig(data=-1))
    >>> batch = global_batch({"tokens": np.zeros((16, 4), np.int32)}, mesh)
    >>> batch["tokens"].shape, batch["tokens"].sharding.spec
    ((16, 4), P(('data', 'fsdp'), None))
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        check_global_batch(global_shape[0], mesh, rules)
        sharding = batch_sharding(mesh, value.ndim, rules)
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
