"""Merging LoRA adapters into base kernels, and combining several adapters of one layer.

Merge / unmerge: `W' = W + scale * A B` and back (computed in float32, cast to W's dtype).

Combining N adapters of the same layer. Decision, after PEFT's `add_weighted_adapter`:
- `linear` acts on the factors (like PEFT's "linear"; ranks must match). With `c_i = w_i * s_i`,
  `A = sum_i sign(c_i) sqrt|c_i| A_i`, `B = sum_i sqrt|c_i| B_i`, used with scale 1. One adapter
  gives exactly `w s A B`; several give cross terms, as in PEFT.
- `task_arithmetic`, `ties`, `dare_linear`, `dare_ties` act on the full deltas (task vectors)
  `delta_i = s_i A_i B_i` (`lora_deltas`): this is what the TIES and DARE papers define, and is
  exact. The result is a dense `[d_in, d_out]` delta to add to the kernel, or to bring back to a
  rank-r adapter with `delta_to_lora` (truncated SVD, PEFT's `*_svd` route).

The combination functions take stacked task tensors `[N, ...]` and weights `[N]`; they are the
tensor-level operations of PEFT's `merge_utils` (magnitude trim, sign election by summed mass,
disjoint mean, random drop with rescale), so they also apply to factors if a user wants that.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from slim_jax.core.dropmerge import check_drop_rate
from slim_jax.errors import ConfigError, ShapeError

SignMethod = Literal["total", "frequency"]


def merge_lora(
    kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array
) -> jax.Array:
    """`W + scale * A B`, in float32, returned in the kernel's dtype.

    Args:
      kernel: `[..., d_in, d_out]`; a: `[..., d_in, r]`; b: `[..., r, d_out]` (leading axes
        alike: the stacked layers of a scanned model, `slim_jax.nn.stack`).

    >>> merge_lora(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    _check_factors(kernel, a, b)
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def unmerge_lora(
    kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array
) -> jax.Array:
    """`W - scale * A B`: the inverse of `merge_lora` (up to rounding in W's dtype).

    >>> unmerge_lora(jnp.full((2, 2), 0.5), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5).tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """
    return merge_lora(kernel, a, b, -scale)


def _check_factors(kernel: jax.Array, a: jax.Array, b: jax.Array) -> None:
    if (
        kernel.ndim < 2
        or a.shape != (*kernel.shape[:-1], a.shape[-1])
        or b.shape != (*kernel.shape[:-2], a.shape[-1], kernel.shape[-1])
    ):
        raise ShapeError(
            f"merging needs kernel [..., d_in, d_out], a [..., d_in, r], b [..., r, d_out]; "
            f"got kernel {kernel.shape}, a {a.shape}, b {b.shape}"
        )


def lora_deltas(a: jax.Array, b: jax.Array, scales: float | jax.Array = 1.0) -> jax.Array:
    """The dense deltas `s_i A_i B_i` of N stacked adapters: `[N, d_in, d_out]`.

    Args:
      a: `[N, d_in, r]`; b: `[N, r, d_out]` (the ranks may differ only if you stack them padded).
      scales: scalar or `[N]` LoRA scales.

    >>> d = lora_deltas(jnp.ones((2, 2, 1)), jnp.ones((2, 1, 1)), jnp.array([1.0, 2.0]))
    >>> d[:, 0, 0].tolist()
    [1.0, 2.0]
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ShapeError(f"lora_deltas needs a [N, d_in, r], b [N, r, d_out]; got {a.shape}, "
                         f"{b.shape}")
    scales = jnp.broadcast_to(jnp.asarray(scales, jnp.float32), (a.shape[0],))
    return jnp.einsum("ndr,nro->ndo", a.astype(jnp.float32), b.astype(jnp.float32)) * scales[
        :, None, None
    ]


def _check_stack(tensors: jax.Array, weights: jax.Array) -> None:
    if tensors.ndim < 1 or weights.shape != (tensors.shape[0],):
        raise ShapeError(
            f"need task tensors [N, ...] and weights [N]; got {tensors.shape} and {weights.shape}"
        )


def _weighted(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    return tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1)).astype(tensors.dtype)


def task_arithmetic(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """Task arithmetic: `sum_i w_i T_i`.

    Args:
      tensors: `[N, ...]` task tensors (e.g. `lora_deltas`).
      weights: `[N]`.

    >>> task_arithmetic(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([1.0, -1.0])).tolist()
    [-2.0, -2.0]
    """
    _check_stack(tensors, weights)
    return _weighted(tensors, weights).sum(axis=0)


def linear(
    a: jax.Array, b: jax.Array, weights: jax.Array, scales: float | jax.Array = 1.0
) -> tuple[jax.Array, jax.Array]:
    """PEFT's factor-wise "linear" combination of N adapters of equal rank (new scale: 1).

    With `c_i = w_i * s_i`: `A = sum_i sign(c_i) sqrt|c_i| A_i`, `B = sum_i sqrt|c_i| B_i`.

    Args:
      a: `[N, d_in, r]`; b: `[N, r, d_out]`.
      weights: `[N]`.
      scales: scalar or `[N]` LoRA scales of the inputs.

    Returns:
      `(a [d_in, r], b [r, d_out])`, to be used with scale 1.

    >>> a, b = linear(jnp.ones((1, 2, 1)), jnp.ones((1, 1, 2)), jnp.array([4.0]))
    >>> (a @ b).tolist()
    [[4.0, 4.0], [4.0, 4.0]]
    """
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ShapeError(
            f"linear combination needs adapters of equal rank stacked as a [N, d_in, r], "
            f"b [N, r, d_out]; got {a.shape}, {b.shape}"
        )
    _check_stack(a, weights)
    c = weights.astype(jnp.float32) * jnp.broadcast_to(jnp.asarray(scales, jnp.float32),
                                                        weights.shape)
    root = jnp.sqrt(jnp.abs(c))
    sign = jnp.where(c >= 0, 1.0, -1.0)
    a_new = task_arithmetic(a.astype(jnp.float32), sign * root).astype(a.dtype)
    b_new = task_arithmetic(b.astype(jnp.float32), root).astype(b.dtype)
    return a_new, b_new


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1] (the fraction of values kept), got {density}")


def magnitude_trim(tensors: jax.Array, density: float) -> jax.Array:
    """TIES trim: keep the `int(density * size)` largest-magnitude values of each task tensor.

    Ties at the threshold go to the lower flat index (`lax.top_k`), so exactly that many survive.

    Args:
      tensors: `[N, ...]`.
      density: fraction kept, in `(0, 1]`.

    >>> magnitude_trim(jnp.array([[1.0, -3.0, 2.0, 0.5]]), 0.5).tolist()
    [[0.0, -3.0, 2.0, 0.0]]
    """
    _check_density(density)
    n = tensors.shape[0]
    flat = tensors.reshape(n, -1)
    k = int(density * flat.shape[1])
    if k >= flat.shape[1]:
        return tensors
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[jnp.arange(n)[:, None], index].set(True)
    return jnp.where(keep, flat, 0).reshape(tensors.shape)


def elect_sign(tensors: jax.Array, method: SignMethod = "total") -> jax.Array:
    """TIES sign election: a mask `[N, ...]` of entries agreeing with the elected sign.

    The elected sign is that of `sum_i T_i` ("total": summed mass) or of `sum_i sign(T_i)`
    ("frequency"); a zero sum elects +. Zero entries never agree with a + election.

    >>> elect_sign(jnp.array([[1.0, -1.0], [-3.0, -1.0]])).tolist()
    [[False, True], [True, True]]
    """
    sign = jnp.sign(tensors)
    if method == "total":
        mass = tensors.sum(axis=0)
    elif method == "frequency":
        mass = sign.sum(axis=0)
    else:
        raise ConfigError(f"unknown sign election {method!r}; accepted: 'total', 'frequency'")
    elected = jnp.where(mass >= 0, 1.0, -1.0)
    return sign == elected


def disjoint_mean(tensors: jax.Array, mask: jax.Array) -> jax.Array:
    """TIES disjoint merge: the mean over the tasks whose entry agrees with the elected sign.

    `sum_i mask_i T_i / max(sum_i mask_i, 1)`.

    >>> mask = jnp.array([[True, False], [True, False]])
    >>> disjoint_mean(jnp.array([[2.0, 1.0], [4.0, 1.0]]), mask).tolist()
    [3.0, 0.0]
    """
    kept = jnp.where(mask, tensors, 0).sum(axis=0)
    return kept / jnp.maximum(mask.sum(axis=0), 1).astype(kept.dtype)


def ties(
    tensors: jax.Array, weights: jax.Array, density: float, *, sign_method: SignMethod = "total"
) -> jax.Array:
    """TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean of the weighted tensors.

    PEFT's order: trim each `T_i` to `density`; elect the sign on the trimmed (unweighted)
    tensors; return `disjoint_mean(w_i T_i, agree)`.

    Args:
      tensors: `[N, ...]` task tensors (e.g. `lora_deltas`).
      weights: `[N]`.
      density: fraction of each task tensor kept, in `(0, 1]`.
      sign_method: "total" (summed mass) or "frequency".

    >>> t = jnp.array([[1.0, -2.0], [3.0, 1.0]])
    >>> ties(t, jnp.ones(2), 1.0).tolist()
    [2.0, -2.0]
    """
    _check_stack(tensors, weights)
    trimmed = magnitude_trim(tensors, density)
    agree = elect_sign(trimmed, sign_method)
    return disjoint_mean(_weighted(trimmed, weights), agree)


def random_drop(
    key: jax.Array, tensors: jax.Array, p: float, *, rescale: bool = True
) -> jax.Array:
    """DARE: drop every entry with probability p, rescale the survivors by `1 / (1 - p)`.

    Args:
      key: PRNG key (one key, one answer).
      tensors: any shape.
      p: drop rate in `[0, 1)`.
      rescale: apply `1 / (1 - p)`.

    >>> random_drop(jax.random.key(0), jnp.ones(3), 0.0).tolist()
    [1.0, 1.0, 1.0]
    """
    check_drop_rate(p, "p")
    if p == 0.0:
        return tensors
    keep = jax.random.bernoulli(key, 1.0 - p, tensors.shape)
    kept = jnp.where(keep, tensors, 0)
    return kept / (1.0 - p) if rescale else kept


def dare_linear(key: jax.Array, tensors: jax.Array, weights: jax.Array, p: float) -> jax.Array:
    """DARE then task arithmetic: `sum_i w_i drop(T_i)` (Yu et al., 2024).

    Args:
      key: PRNG key, split over the N tasks by the bernoulli draw itself.
      tensors: `[N, ...]`; weights: `[N]`; p: drop rate in `[0, 1)`.

    >>> dare_linear(jax.random.key(0), jnp.ones((2, 3)), jnp.ones(2), 0.0).tolist()
    [2.0, 2.0, 2.0]
    """
    _check_stack(tensors, weights)
    return task_arithmetic(random_drop(key, tensors, p), weights)


def dare_ties(
    key: jax.Array,
    tensors: jax.Array,
    weights: jax.Array,
    p: float,
    *,
    sign_method: SignMethod = "total",
) -> jax.Array:
    """DARE then TIES' sign election and disjoint mean (PEFT's "dare_ties").

    >>> t = jnp.array([[1.0, -1.0], [3.0, -3.0]])
    >>> dare_ties(jax.random.key(0), t, jnp.ones(2), 0.0).tolist()
    [2.0, -2.0]
    """
    _check_stack(tensors, weights)
    dropped = random_drop(key, tensors, p)
    agree = elect_sign(dropped, sign_method)
    return disjoint_mean(_weighted(dropped, weights), agree)


def delta_to_lora(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-r factors of a dense delta (truncated SVD), used with scale 1.

    `delta ~= A B` with `A = U_r sqrt(S_r)` `[d_in, r]` and `B = sqrt(S_r) V_r^T` `[r, d_out]`;
    exact when `rank(delta) <= r`.

    >>> a, b = delta_to_lora(jnp.outer(jnp.arange(3.0), jnp.ones(2)), 1)
    >>> jnp.allclose(a @ b, jnp.outer(jnp.arange(3.0), jnp.ones(2)), atol=1e-5).item()
    True
    """
    if delta.ndim != 2:
        raise ShapeError(f"delta_to_lora needs a [d_in, d_out] delta, got {delta.shape}")
    if not 1 <= rank <= min(delta.shape):
        raise ConfigError(f"rank must be between 1 and {min(delta.shape)}, got {rank}")
    u, s, vt = jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]
