"""Layer stacks: N layers of one structure held as one layer whose variables have a leading
`layers` axis, applied with `jax.lax.scan`, so a deep model compiles one layer body (one XLA
while loop) instead of N copies.

Users never see the stacked layout: `per_layer(model)` swaps every `LayerStack` of a model, in
place, for an `nnx.List` of its layers (paths `layers/0/...`, as an unstacked model has) and
stacks them back afterwards; `inject`, `adapter_spec`, the adapter and PEFT loaders and savers
work through it, and `stack_arrays` turns per-layer checkpoint names into stacked arrays
(`stack_leaves`: JAX arrays, such as LoRAHub's module factors), so
Hugging Face, PEFT and slim_jax adapter files keep per-layer names whatever the layout.

Every variable of the stack carries `layers` first in its `logical_axes` (mapped to no mesh
axis by the default rules), except `TokenMask`s, which hold one mask for every layer. Orbax
training checkpoints of a scanned model hold the stacked arrays (they resume a scanned run).
Within the scan the layers run as pure functions of their state, so `nnx.capture`
intermediates (SLIM's sown routing weights) are not collected from a scanned model.

>>> layers = [nnx.Linear(3, 3, rngs=nnx.Rngs(i)) for i in range(4)]
>>> stack = LayerStack(layers)
>>> stack.layer.kernel.shape, stack.num_layers
((4, 3, 3), 4)
>>> y, _ = stack.scan(lambda layer, x, _: (layer(x), None), jnp.ones((1, 3)))
>>> x = jnp.ones((1, 3))
>>> for layer in layers:
...     x = layer(x)
>>> bool(jnp.allclose(y, x, atol=1e-6))
True
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.nn.variables import TokenMask

LAYERS_AXIS = "layers"
"""The logical axis name of the stacked dimension (`slim_jax.parallel.rules`: no mesh axis)."""
STACK_ATTR = "layer"
"""The attribute of `LayerStack` that holds the stacked layer: stacked paths read
`layers/layer/self_attn/q_proj/kernel`."""


def _stack_values(values: Sequence[Any]) -> Any:
    """`[L, ...]` of L equal-shaped values (arrays, tracers, or `jax.ShapeDtypeStruct`s)."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    return jnp.stack(values)


def _take(value: Any, i: int) -> Any:
    if value is None:
        return None
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[i]


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _stacked_axes(var: nnx.Variable) -> dict[str, Any]:
    axes = var.get_metadata("logical_axes", None)
    return {} if axes is None else {"logical_axes": (LAYERS_AXIS, *axes)}


def _layer_axes(var: nnx.Variable) -> dict[str, Any]:
    axes = var.get_metadata("logical_axes", None)
    if axes is None or not axes or axes[0] != LAYERS_AXIS:
        return {}
    return {"logical_axes": tuple(axes[1:])}


class LayerStack(nnx.Module):
    """`num_layers` layers of one structure, stacked (module docstring).

    Attributes:
      layer: the stacked layer: every variable `[num_layers, ...]` (`TokenMask`s unstacked).
      num_layers: N.

    Raises (constructor):
      ConfigError: no layers, or layers that differ in structure (e.g. adapters on some layers
        only: a stack needs the same adapters on every layer).
    """

    def __init__(self, layers: Sequence[nnx.Module]):
        if not layers:
            raise ConfigError("a LayerStack needs at least one layer")
        graphdefs, states = zip(*(nnx.split(layer) for layer in layers), strict=True)
        for i, graphdef in enumerate(graphdefs):
            if graphdef != graphdefs[0]:
                raise ConfigError(
                    f"layer {i} of a stacked model differs in structure from layer 0 (e.g. "
                    "adapters on some layers only); with scan_layers every layer must carry the "
                    "same adapters (or turn scan_layers off)")

        def stack(*variables: nnx.Variable) -> nnx.Variable:
            first = variables[0]
            if isinstance(first, TokenMask):
                return first.copy(first.get_value())
            return first.copy(_stack_values([v.get_value() for v in variables]),
                              **_stacked_axes(first))

        stacked = jax.tree.map(stack, *states, is_leaf=_is_var)
        self.layer = nnx.merge(graphdefs[0], stacked)
        self.num_layers = len(layers)

    def unstack(self, *, frozen_abstract: bool = False) -> list[nnx.Module]:
        """The N layers as separate modules (copies of their slices; abstract stays abstract).

        `frozen_abstract`: frozen parameters (`nnx.Param` but not `nnx.LoRAParam`) come out as
        `jax.ShapeDtypeStruct`s, not copied (for reading the adapters of a large model)."""
        graphdef, state = nnx.split(self.layer)

        def take(i: int) -> nnx.State:
            def one(var: nnx.Variable) -> nnx.Variable:
                if isinstance(var, TokenMask):
                    return var.copy(var.get_value())
                value = var.get_value()
                if (frozen_abstract and isinstance(var, nnx.Param)
                        and not isinstance(var, nnx.LoRAParam)):
                    value = jax.ShapeDtypeStruct(value.shape, value.dtype)
                return var.copy(_take(value, i), **_layer_axes(var))

            return jax.tree.map(one, state, is_leaf=_is_var)

        return [nnx.merge(graphdef, take(i)) for i in range(self.num_layers)]

    def scan(
        self,
        fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
        carry: Any,
        xs: Any = None,
    ) -> tuple[Any, Any]:
        """`carry, ys`: `carry, y_i = fn(layer_i, carry, xs_i)` for i = 0..N-1 in one
        `jax.lax.scan` (`xs`, `ys`: pytrees with a leading N axis, or None).

        Parameters go in as scanned inputs only; the layers' other variables (SLIM cluster
        statistics, RNG counts) come out updated and are written back to the stack.
        """
        graphdef, params, masks, rest = nnx.split(self.layer, nnx.Param, TokenMask, ...)

        def body(carry: Any, inputs: tuple[Any, Any, Any]) -> tuple[Any, tuple[Any, Any]]:
            params_i, rest_i, x_i = inputs
            # The masks' Variables rebuilt here, so the layer may write them in this trace.
            module = nnx.merge(graphdef, params_i, jax.tree.map(lambda m: m, masks), rest_i)
            carry, y = fn(module, carry, x_i)
            return carry, (nnx.state(module, nnx.Not(nnx.Any(nnx.Param, TokenMask))), y)

        carry = _varying_like((params, rest, xs), carry)
        carry, (rest, ys) = jax.lax.scan(body, carry, (params, rest, xs))
        nnx.update(self.layer, rest)
        return carry, ys


def _varying_like(inputs: Any, carry: Any) -> Any:
    """`carry` marked as varying over every mesh axis some leaf of `inputs` varies over.

    Inside `shard_map` (LoRAHub's population split over devices: each device's candidates
    compose their own adapters) the stacked parameters vary over the mesh axis while the carry
    (the embedded tokens) may not; the carry out of the body then does, and `lax.scan` needs the
    carry's type in and out equal. Outside `shard_map` nothing varies and `carry` is returned
    as it is.
    """
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying
                               for x in jax.tree.leaves(inputs)))
    if not axes:
        return carry
    return jax.tree.map(lambda c: jax.lax.pcast(
        c, tuple(sorted(axes - jax.typeof(c).manual_axis_type.varying)), to="varying"), carry)


def _stacks(model: nnx.Module) -> list[tuple[tuple[Any, ...], LayerStack]]:
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LayerStack)]


def _parent(model: nnx.Module, path: tuple[Any, ...]) -> Any:
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(node, Sequence | Mapping) else getattr(node, key)
    return node


def _set(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, nnx.List | list | nnx.Dict | dict):
        parent[key] = value
    else:
        setattr(parent, key, value)


def has_stacks(model: nnx.Module) -> bool:
    """Whether `model` holds a `LayerStack` (a scanned model)."""
    return bool(_stacks(model))


_FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@contextlib.contextmanager
def per_layer(model: nnx.Module, *, frozen_abstract: bool = False) -> Iterator[nnx.Module]:
    """Within the block, every `LayerStack` of `model` is an `nnx.List` of its layers (in
    place: paths read `layers/0/...`); on leaving, they are stacked again (also on error).

    `frozen_abstract`: inside the block the frozen parameters (`nnx.Param`, not `nnx.LoRAParam`)
    are shapes only, and the stacked originals are put back on leaving: the base is never
    copied (for changing adapters only: injection, adapter loading; not for calling the model).

    Raises (on leaving):
      ConfigError: the layers no longer share one structure (`LayerStack`).

    >>> class Model(nnx.Module):
    ...     def __init__(self):
    ...         self.layers = LayerStack([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(2)])
    >>> model = Model()
    >>> with per_layer(model):
    ...     model.layers[1].kernel.shape
    (2, 2)
    >>> model.layers.layer.kernel.shape
    (2, 2, 2)
    """
    stacks = _stacks(model)
    frozen = [nnx.state(stack.layer, _FROZEN) if frozen_abstract else None for _, stack in stacks]
    for path, stack in stacks:
        _set(_parent(model, path), path[-1],
             nnx.List(stack.unstack(frozen_abstract=frozen_abstract)))
    try:
        yield model
    finally:
        for (path, _), base in zip(stacks, frozen, strict=True):
            parent = _parent(model, path)
            layers = parent[path[-1]] if isinstance(parent, nnx.List | nnx.Dict) else getattr(
                parent, path[-1])
            stack = LayerStack(list(layers))
            if base is not None:  # the original stacked base, at the same paths
                nnx.update(stack.layer, base)
            _set(parent, path[-1], stack)


def per_layer_view(model: nnx.Module, *, frozen_abstract: bool = True) -> nnx.Module:
    """A copy of `model` whose `LayerStack`s are `nnx.List`s of layers (paths `layers/0/...`);
    `model` itself unchanged (for reading: saving adapters under per-layer names). A model
    without stacks is returned as it is.

    `frozen_abstract`: the stacked layers' frozen parameters come out as shapes only (no copy of
    the base); the adapters and other state are copied per layer."""
    if not has_stacks(model):
        return model
    copy = nnx.merge(*nnx.split(model))
    for path, stack in _stacks(copy):
        layers = stack.unstack(frozen_abstract=frozen_abstract)
        _set(_parent(copy, path), path[-1], nnx.List(layers))
    return copy


class StackedArray:
    """L equal-shaped arrays (NumPy or `slim_jax.models.lazy.LazyTensor`) as one `[L, ...]`
    array, read block by block: indexing reads only the layers and slices asked for.

    >>> s = StackedArray([np.zeros((2, 3)), np.ones((2, 3))])
    >>> s.shape, s[1:, :, :2].tolist()
    ((2, 2, 3), [[[1.0, 1.0], [1.0, 1.0]]])
    """

    def __init__(self, arrays: Sequence[Any]):
        self.arrays = list(arrays)
        self.shape = (len(self.arrays), *tuple(np.shape(self.arrays[0])))
        self.dtype = np.dtype(self.arrays[0].dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def astype(self, dtype: Any, copy: bool = True) -> StackedArray:
        return StackedArray([a.astype(dtype) for a in self.arrays])

    def __getitem__(self, index: Any) -> np.ndarray:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        rows = range(self.shape[0])[index[0]]
        return np.stack([np.asarray(self.arrays[i][index[1:]]) for i in rows])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[(slice(None),) * self.ndim]
        return whole if dtype is None else whole.astype(dtype)


def _group_layers(model: nnx.Module, arrays: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """`(unstacked, {stacked path: [N per-layer values, in layer order]})` of per-layer
    `{path: value}` in `model`'s layout (`stack_arrays`)."""
    stacks = {"/".join(map(str, path)): stack.num_layers for path, stack in _stacks(model)}
    if not stacks:
        return dict(arrays), {}
    out: dict[str, Any] = {}
    grouped: dict[tuple[str, str], dict[int, Any]] = {}
    pattern = re.compile(r"^(?P<prefix>" + "|".join(map(re.escape, stacks)) +
                         r")/(?P<i>\d+)/(?P<rest>.+)$")
    for name, array in arrays.items():
        match = pattern.match(name)
        if match is None:
            out[name] = array
            continue
        grouped.setdefault((match["prefix"], match["rest"]), {})[int(match["i"])] = array
    layers: dict[str, list[Any]] = {}
    for (prefix, rest), by_layer in grouped.items():
        n = stacks[prefix]
        missing = [i for i in range(n) if i not in by_layer]
        if missing or len(by_layer) != n:
            which = f"{prefix}/{missing[0]}/{rest}" if missing else f"{prefix}/{n}+/{rest}"
            raise CheckpointError(f"a scanned model stacks all {n} layers of {prefix}, but "
                              f"{which} is missing or extra; every layer needs the same tensors")
        layers[f"{prefix}/{STACK_ATTR}/{rest}"] = [by_layer[i] for i in range(n)]
    return out, layers


def stack_arrays(model: nnx.Module, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer `{path: array}` (`layers/3/mlp/up_proj/kernel`) in `model`'s layout: for each
    `LayerStack` at `P`, the N arrays `P/i/rest` become one `StackedArray` at `P/layer/rest`
    (read on demand); other paths pass unchanged. A model without stacks gets `arrays` back.

    Raises:
      CheckpointError: a stacked name present for some layers but not all (naming one missing).

    >>> class Model(nnx.Module):
    ...     def __init__(self):
    ...         self.layers = LayerStack([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(2)])
    >>> out = stack_arrays(Model(), {"layers/0/kernel": np.zeros((2, 2)),
    ...                              "layers/1/kernel": np.ones((2, 2))})
    >>> {k: v.shape for k, v in out.items()}
    {'layers/layer/kernel': (2, 2, 2)}
    """
    out, layers = _group_layers(model, arrays)
    return {**out, **{path: StackedArray(values) for path, values in layers.items()}}


def stack_leaves(model: nnx.Module, leaves: Mapping[str, jax.Array], *, axis: int = 0
                 ) -> dict[str, jax.Array]:
    """`stack_arrays` for JAX arrays (or tracers), stacked now with `jnp.stack(..., axis)`:
    per-layer `{path: [...]}` in `model`'s layout, the layers axis at `axis` (e.g. 1 for
    LoRAHub's `[N, ...]` module factors, which become `[N, layers, ...]`).

    Raises:
      CheckpointError: as `stack_arrays`.

    >>> class Model(nnx.Module):
    ...     def __init__(self):
    ...         self.layers = LayerStack([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(3)])
    >>> out = stack_leaves(Model(), {f"layers/{i}/kernel": jnp.zeros((5, 2, 2)) for i in range(3)},
    ...                    axis=1)
    >>> {k: v.shape for k, v in out.items()}
    {'layers/layer/kernel': (5, 3, 2, 2)}
    """
    out, layers = _group_layers(model, leaves)
    return {**out, **{path: jnp.stack(values, axis) for path, values in layers.items()}}
