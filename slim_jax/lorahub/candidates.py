"""What every LoRAHub search shares: the result, the box, and scoring of candidate weights.

- `SearchResult`: what every search returns (`slim_jax.lorahub.search`).
- `bounce`: nevergrad's "bouncing" bound, the reference's treatment of out-of-box proposals.
- `score_population` / `score_candidates`: P candidates `[P, N]` in one `jax.vmap`ped forward
  pass (optionally split over a device mesh), or one pass each ("sequential").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from slim_jax.errors import ConfigError
from slim_jax.parallel import MeshConfig, make_mesh

Scoring = Literal["vmap", "sequential"]
BOUND = 1.5
DEFAULT_BUDGET = 40


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a search found.

    Attributes:
      method: the search's name in `slim_jax.lorahub.SEARCHES` ("cmaes", "cobyla", ...).
      weights: `[N]` the best composition weights evaluated (inside the box).
      objective: their objective.
      values: `[evaluations]` the objective of every evaluation, in order.
      evaluations: evaluations spent.
      seconds: wall time of the search (compilation included).
      times: `[evaluations]` execution seconds (compilation excluded) after which each
        evaluation's value was known; a vmapped generation's candidates share one time. None
        when not measured.
      compile_seconds: seconds spent compiling the search's programs.
    """

    method: str
    weights: np.ndarray
    objective: float
    values: np.ndarray
    evaluations: int
    seconds: float
    times: np.ndarray | None = None
    compile_seconds: float = 0.0

    @property
    def history(self) -> np.ndarray:
        """`[evaluations]` the best objective so far after each evaluation."""
        return np.minimum.accumulate(self.values)


def bounce(x: jax.Array, bound: float = BOUND) -> jax.Array:
    """nevergrad's "bouncing" bound (`Clipping(bounce=True)`), elementwise: reflect once at the
    wall, then clip, `clip(2 clip(x) - x)`.

    The reference bounds its weights so (`ng.p.Array(lower=-1.5, upper=1.5)`, whose default bound
    method is "bouncing"): the identity inside the box, a mirror for overshoots up to one box
    width, the wall beyond.

    >>> bounce(jnp.array([0.5, 1.75, -2.0, 4.0, 7.0]), 1.5).tolist()
    [0.5, 1.25, -1.0, -1.0, -1.5]
    """
    xp = np if isinstance(x, np.ndarray) else jnp  # NumPy in, NumPy out (COBYLA's float64 path)
    inside = xp.clip(x, -bound, bound)
    return xp.clip(2 * inside - x, -bound, bound)


class SearchObjective(Protocol):
    """What a search needs: a pytree (jit takes it whole) scoring weight vectors.

    `Objective` is one; `slim_jax.lorahub.toy.QuadraticObjective` is a toy with a known optimum.
    """

    @property
    def num_modules(self) -> int: ...

    def __call__(self, weights: jax.Array) -> jax.Array: ...

    def population(self, weights: jax.Array, *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = "data") -> jax.Array: ...


def check_search(objective: SearchObjective, budget: int, bound: float) -> None:
    """The checks every search makes first (one-line `ConfigError`s)."""
    if not all(hasattr(objective, a) for a in ("num_modules", "population", "__call__")):
        raise ConfigError(f"expected an objective such as slim_jax.lorahub.Objective (with "
                          f"num_modules, __call__ and population), got {type(objective).__name__}")
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 evaluation, got {budget}")
    if not bound > 0:
        raise ConfigError(f"bound must be > 0, got {bound}")


POPULATION_AXIS = "data"  # population_mesh's axis over the candidates
EXAMPLE_AXIS = "fsdp"  # ... and over the ADAPT examples' rows (`Objective.population`)


def population_mesh(population_size: int, devices: list[jax.Device] | None = None) -> Mesh | None:
    """A mesh for scoring a population: candidates split over axis `data`, the rest of the
    devices over axis `fsdp`, which splits each candidate's ADAPT examples (rows).

    It spans as many of `devices` as a split `data x fsdp` with `data` dividing P can (all of
    them whenever P or the device count allows: on TPU slices with limited ICI routing, such
    as v5e-64 and v5e-256, XLA compiles a multi-chip program only over the whole slice); of
    equal spans the one with the larger population split (no example padding). None on a single
    device (no split needed).

    With 8 devices, P = 4 gives `data 4 x fsdp 2` (each candidate's rows in two halves), P = 16
    `data 8`, P = 6 `data 2 x fsdp 4` (all 8 devices rather than 6).

    >>> population_mesh(16, jax.devices()[:1]) is None
    True
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    count = max((d for d in range(1, min(population_size, n) + 1) if population_size % d == 0),
                key=lambda d: (d * (n // d), d))
    rest = n // count
    if count * rest == 1:
        return None
    return make_mesh(MeshConfig(data=count, fsdp=rest), devices[:count * rest])


def resolve_mesh(mesh: Mesh | Literal["auto"] | None, population_size: int,
                 scoring: Scoring) -> Mesh | None:
    """`mesh`, with "auto" meaning `population_mesh(population_size)` for vmapped scoring."""
    if scoring not in ("vmap", "sequential"):
        raise ConfigError(f"scoring must be 'vmap' or 'sequential', got {scoring!r}")
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ConfigError(f"mesh must be a jax Mesh, None or 'auto', got {mesh!r}")
        return population_mesh(population_size) if scoring == "vmap" else None
    return mesh


def score_population(objective: SearchObjective, weights: jax.Array, *, scoring: Scoring = "vmap",
                     mesh: Mesh | None = None) -> jax.Array:
    """Objectives `[P]` of candidates `weights [P, N]`: vmapped (optionally over `mesh`) or one
    forward pass per candidate ("sequential"). Traceable; jit it, or call `score_candidates`."""
    if scoring == "vmap":
        return objective.population(weights, mesh=mesh)
    if scoring == "sequential":
        return jax.lax.map(objective, weights)
    raise ConfigError(f"scoring must be 'vmap' or 'sequential', got {scoring!r}")


@functools.partial(jax.jit, static_argnames=("scoring", "mesh"))
def score_candidates(objective: SearchObjective, weights: jax.Array, *, scoring: Scoring = "vmap",
                     mesh: Mesh | None = None) -> jax.Array:
    """`score_population` under `jax.jit` (e.g. every single module, `jnp.eye(N)`, at once)."""
    return score_population(objective, weights, scoring=scoring, mesh=mesh)
