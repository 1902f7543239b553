"""LoRAHub composition (LORAHUB.md s2): a weighted sum of N adapters, factor by factor.

For every adapted layer `A_hat = sum_i w_i A_i` and `B_hat = sum_i w_i B_i`; the layer then computes
`x W + scale * (x A_hat) B_hat`. This is not `sum_i w_i B_i A_i`: the product of the sums holds the
cross terms `w_i w_j A_i B_j`, exactly as LoRAHub's reference code does.

Adapters are any pytrees (a `(a, b)` pair, a dict, an `nnx.State` of adapter parameters); N of
them are stacked leaf by leaf into one pytree whose leaves carry a leading `[N]` axis
(`stack_adapters`), which `compose` contracts with `w [N]` and `compose_population` with a
population `w [P, N]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from slim_jax.errors import ShapeError

T = TypeVar("T")


def path_str(path: tuple[Any, ...]) -> str:
    """A jax key path as a '/'-joined string (`layers/0/q/lora_a`), dropping Variable `.value`.

    >>> path_str(jax.tree_util.tree_flatten_with_path({"q": {"a": 1}})[0][0][0])
    'q/a'
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name not in ("value", "raw_value"):
                parts.append(key.name)
        else:
            parts.append(str(key).strip(".[]'\""))
    return "/".join(parts)


def stack_adapters(adapters: Sequence[T]) -> T:
    """Stack N adapters of identical structure and shapes into one pytree with leading `[N]`.

    Args:
      adapters: N pytrees (N >= 1) with the same structure, leaf shapes and dtypes.

    Returns:
      One pytree of the same structure; every leaf `[N, ...]`.

    Raises:
      ShapeError: naming the adapter and the layer path whose shape (rank) or structure differs.

    >>> s = stack_adapters([{"a": jnp.ones((2, 1))}, {"a": jnp.zeros((2, 1))}])
    >>> s["a"].shape
    (2, 2, 1)
    """
    if not adapters:
        raise ShapeError("stack_adapters needs at least one adapter, got none")
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(adapter)
        if treedef != ref_def:
            ref_paths = {path_str(p) for p, _ in ref_leaves}
            paths = {path_str(p) for p, _ in leaves}
            diff = sorted(ref_paths ^ paths)[:5]
            raise ShapeError(
                f"adapter {i} does not have the layers of adapter 0 (differing paths: {diff}); "
                "all adapters must adapt the same layers"
            )
        for (path, ref), (_, leaf) in zip(ref_leaves, leaves, strict=True):
            if jnp.shape(ref) != jnp.shape(leaf):
                raise ShapeError(
                    f"adapter {i} has shape {jnp.shape(leaf)} at {path_str(path)}, adapter 0 has "
                    f"{jnp.shape(ref)}: all adapters must have the same ranks and shapes"
                )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def _check_weights(weights: jax.Array, stacked: Any, lead: str) -> int:
    n = weights.shape[-1]
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
            raise ShapeError(
                f"weights {lead} need every adapter leaf stacked with a leading axis of {n}; "
                f"{path_str(path)} has shape {jnp.shape(leaf)}"
            )
    return n


def compose(weights: jax.Array, stacked: T) -> T:
    """LoRAHub composition: the weighted sum over the leading adapter axis, leaf by leaf.

    LORAHUB.md s2: `A_hat = sum_i w_i A_i`, `B_hat = sum_i w_i B_i` (factor-wise; cross terms
    included).

    Args:
      weights: `[N]` composition weights.
      stacked: a pytree whose leaves are `[N, ...]` (from `stack_adapters`), e.g. `(a, b)` with
        a `[N, d_in, r]` and b `[N, r, d_out]`.

    Returns:
      The same pytree with the `[N]` axis contracted (summed in float32, leaves keep their
      dtype).

    >>> a = jnp.stack([jnp.ones((2, 1)), 2 * jnp.ones((2, 1))])
    >>> compose(jnp.array([0.5, 0.25]), {"a": a})["a"].tolist()
    [[1.0], [1.0]]
    """
    if weights.ndim != 1:
        raise ShapeError(f"compose needs weights [N], got shape {weights.shape}; "
                         "use compose_population for [P, N]")
    _check_weights(weights, stacked, "[N]")
    def weighted_sum(leaf: jax.Array) -> jax.Array:  # in float32, back to the leaf's dtype
        out = jnp.tensordot(weights.astype(jnp.float32), leaf.astype(jnp.float32), axes=1)
        return out.astype(leaf.dtype)

    return jax.tree.map(weighted_sum, stacked)


def compose_population(weights: jax.Array, stacked: T) -> T:
    """`compose` for a population of weight vectors: `[P, N]` weights give leaves `[P, ...]`.

    Equal to stacking `compose(weights[p], stacked)` over p (a `jax.vmap` of `compose`).

    >>> a = jnp.stack([jnp.ones(2), jnp.zeros(2)])
    >>> compose_population(jnp.array([[1.0, 0.0], [0.5, 0.5]]), a).tolist()
    [[1.0, 1.0], [0.5, 0.5]]
    """
    if weights.ndim != 2:
        raise ShapeError(f"compose_population needs weights [P, N], got shape {weights.shape}")
    _check_weights(weights, stacked, "[P, N]")
    return jax.vmap(compose, in_axes=(0, None))(weights, stacked)
