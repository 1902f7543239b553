"""Toy search objectives with known optima, for examples and quick checks of the searches.

Both have the interface of `slim_jax.lorahub.Objective` (a pytree with `num_modules`, `__call__`
and `population`) without a model: `QuadraticObjective` is `f(w) = |w - w*|^2 + offset`;
`CompositionObjective` is LoRAHub's bilinear composition of random factors against a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from slim_jax.lorahub.objective import vmapped_population


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuadraticObjective:
    """`f(w) = sum_i (w_i - target_i)^2 + offset`, minimised at `target` with value `offset`.

    >>> f = QuadraticObjective.around([1.0, 0.0])
    >>> float(f(jnp.zeros(2))), f.population(jnp.ones((3, 2))).tolist()
    (1.0, [1.0, 1.0, 1.0])
    """

    target: jax.Array
    offset: jax.Array

    @classmethod
    def around(cls, target: Sequence[float], offset: float = 0.0) -> QuadraticObjective:
        """The objective minimised at `target`."""
        return cls(jnp.asarray(target, jnp.float32), jnp.asarray(offset, jnp.float32))

    @property
    def num_modules(self) -> int:
        """N, the length of a weight vector."""
        return self.target.shape[0]

    def __call__(self, weights: jax.Array) -> jax.Array:
        return jnp.sum((jnp.asarray(weights, jnp.float32) - self.target) ** 2) + self.offset

    def population(self, weights: jax.Array, *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = "data") -> jax.Array:
        """`[P]` objectives of `weights [P, N]` (split over `mesh` when given)."""
        return vmapped_population(self, weights, mesh=mesh, axis=axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompositionObjective:
    """LoRAHub's problem without a model: N rank-r modules `(A_i [d, r], B_i [r, d])` composed
    as `(sum_i w_i A_i)(sum_i w_i B_i)` (cross terms included, LORAHUB.md s2), scored by the
    relative squared distance to a target delta, plus `offset` (the loss no composition removes)
    and LoRAHub's `0.05 * mean|w|`.

    `around(w_star)` makes the target the composition of `w_star`, so `f(w_star)` is `offset +
    0.05 * mean|w_star|` and the optimum is at most that: a single module is optimal when
    `w_star` is a unit vector, a mixture otherwise.

    >>> f = CompositionObjective.around([1.0, 0.0, 0.0])
    >>> round(float(f(jnp.asarray([1.0, 0.0, 0.0]))), 4), round(float(f(jnp.zeros(3))), 4)
    (0.0167, 1.0)
    """

    a: jax.Array  # [N, d, r]
    b: jax.Array  # [N, r, d]
    target: jax.Array  # [d, d]
    offset: jax.Array
    l1_coeff: float = dataclasses.field(default=0.05, metadata={"static": True})

    @classmethod
    def around(cls, w_star: Sequence[float], *, dim: int = 8, rank: int = 2, offset: float = 0.0,
               seed: int = 0) -> CompositionObjective:
        """Random modules and the target written by the composition `w_star`."""
        n = len(w_star)
        ka, kb = jax.random.split(jax.random.key(seed))
        a = jax.random.normal(ka, (n, dim, rank)) / jnp.sqrt(dim)
        b = jax.random.normal(kb, (n, rank, dim))
        w = jnp.asarray(w_star, jnp.float32)
        target = jnp.einsum("n,ndr->dr", w, a) @ jnp.einsum("n,nrd->rd", w, b)
        return cls(a, b, target, jnp.asarray(offset, jnp.float32))

    @property
    def num_modules(self) -> int:
        """N, the length of a weight vector."""
        return self.a.shape[0]

    def __call__(self, weights: jax.Array) -> jax.Array:
        w = jnp.asarray(weights, jnp.float32)
        delta = jnp.einsum("n,ndr->dr", w, self.a) @ jnp.einsum("n,nrd->rd", w, self.b)
        loss = jnp.sum((delta - self.target) ** 2) / jnp.sum(self.target ** 2)
        return loss + self.offset + self.l1_coeff * jnp.mean(jnp.abs(w))

    def population(self, weights: jax.Array, *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = "data") -> jax.Array:
        """`[P]` objectives of `weights [P, N]` (split over `mesh` when given)."""
        return vmapped_population(self, weights, mesh=mesh, axis=axis)
