"""A toy search objective with a known optimum, for examples and quick checks of the searches.

`QuadraticObjective` has the interface of `slim_jax.lorahub.Objective` (a pytree with
`num_modules`, `__call__` and `population`) without a model: `f(w) = |w - w*|^2 + offset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


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
        score = jax.vmap(lambda obj, w: obj(w), in_axes=(None, 0))
        if mesh is None:
            return score(self, weights)
        spec = PartitionSpec(axis)
        return jax.shard_map(score, mesh=mesh, in_specs=(PartitionSpec(), spec),
                             out_specs=spec)(self, weights)
