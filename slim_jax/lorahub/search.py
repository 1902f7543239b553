"""Searches for LoRAHub's composition weights `w in [-bound, bound]^N` (LORAHUB.md s4).

- `cmaes_search`: evosax CMA-ES. Each generation asks for P candidates, scores all of them in one
  jitted `jax.vmap`ped forward pass (`Objective.population`; split over devices with a mesh) and
  tells the fitnesses back; the generations run under `jax.lax.scan`, so a whole search is one
  compiled program. `scoring="sequential"` scores the same candidates one forward pass each
  (`jax.lax.map`), for comparison.
- `cobyla_search`: the reference's optimiser. nevergrad's NGOpt picks COBYLA for LoRAHub's setting
  (budget 40, 20 bounded weights); it runs scipy's COBYLA from 0 with `rhobeg` 1 and `tol` 0
  (which scipy's PRIMA COBYLA reads as 1e-6), restarting from the best point while budget is left,
  and folds out-of-range proposals back into the box. One candidate per forward pass, driven from
  Python.
- `gradient_search`: Adam on `w` through the composition (`jax.grad`), projected onto the box.

Every search starts from 0 (the base model, which CMA-ES and COBYLA evaluate first), spends at
most `budget` evaluations, and returns the best candidate ever evaluated with its objective and
the best-so-far objective after each evaluation (`SearchResult`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from evosax.algorithms import CMA_ES
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
      method: "cmaes", "cobyla" or "gradient".
      weights: `[N]` the best composition weights evaluated (inside the box).
      objective: their objective.
      values: `[evaluations]` the objective of every evaluation, in order.
      evaluations: evaluations spent.
      seconds: wall time of the search (compilation included).
    """

    method: str
    weights: np.ndarray
    objective: float
    values: np.ndarray
    evaluations: int
    seconds: float

    @property
    def history(self) -> np.ndarray:
        """`[evaluations]` the best objective so far after each evaluation."""
        return np.minimum.accumulate(self.values)


def fold(x: jax.Array, bound: float = BOUND) -> jax.Array:
    """Reflect `x` back into `[-bound, bound]` (nevergrad's "bouncing"), elementwise.

    fold(x) = b - |((x + b) mod 4b) - 2b|: the identity inside the box, a mirror at each wall.

    >>> fold(jnp.array([0.5, 1.75, -2.0, 7.0]), 1.5).tolist()
    [0.5, 1.25, -1.0, 1.0]
    """
    return bound - jnp.abs(jnp.mod(x + bound, 4 * bound) - 2 * bound)


class SearchObjective(Protocol):
    """What a search needs: a pytree (jit takes it whole) scoring weight vectors.

    `Objective` is one; `slim_jax.lorahub.toy.QuadraticObjective` is a toy with a known optimum.
    """

    @property
    def num_modules(self) -> int: ...

    def __call__(self, weights: jax.Array) -> jax.Array: ...

    def population(self, weights: jax.Array, *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = "data") -> jax.Array: ...


def _check(objective: SearchObjective, budget: int, bound: float) -> None:
    if not all(hasattr(objective, a) for a in ("num_modules", "population", "__call__")):
        raise ConfigError(f"expected an objective such as slim_jax.lorahub.Objective (with "
                          f"num_modules, __call__ and population), got {type(objective).__name__}")
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 evaluation, got {budget}")
    if not bound > 0:
        raise ConfigError(f"bound must be > 0, got {bound}")


def population_mesh(population_size: int, devices: list[jax.Device] | None = None) -> Mesh | None:
    """A mesh splitting a population over as many devices as divide it evenly (axis `data`).

    None on a single device (no split needed).

    >>> population_mesh(16, jax.devices()[:1]) is None
    True
    """
    devices = list(jax.devices() if devices is None else devices)
    count = max(d for d in range(1, len(devices) + 1) if population_size % d == 0)
    return None if count == 1 else make_mesh(MeshConfig(data=count), devices[:count])


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


@functools.lru_cache(maxsize=32)
def _strategy(population_size: int, num_dims: int) -> CMA_ES:
    # One instance per shape: jit treats the strategy as static, hashed by identity.
    return CMA_ES(population_size=population_size, solution=jnp.zeros(num_dims))


@functools.partial(jax.jit, static_argnames=("strategy", "generations", "bound", "scoring",
                                             "mesh"))
def _cmaes(objective: SearchObjective, key: jax.Array, sigma: jax.Array, *, strategy: CMA_ES,
           generations: int, bound: float, scoring: Scoring, mesh: Mesh | None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole CMA-ES search: `(best w [N], best objective [], values [G, P])`."""
    n = strategy.num_dims
    params = strategy.default_params.replace(std_init=sigma)
    init_key, run_key = jax.random.split(key)
    state = strategy.init(init_key, jnp.zeros(n), params)  # start: mean 0

    def generation(carry: tuple[Any, jax.Array, jax.Array], inputs: tuple[jax.Array, jax.Array]):
        state, best_w, best_f = carry
        key, index = inputs
        ask_key, tell_key = jax.random.split(key)
        x, state = strategy.ask(ask_key, state, params)  # [P, N]
        # The start point itself is the first candidate evaluated, as in the reference.
        x = x.at[0].set(jnp.where(index == 0, jnp.zeros(n), x[0]))
        w = fold(x, bound)
        f = score_population(objective, w, scoring=scoring, mesh=mesh)  # [P]
        state, _ = strategy.tell(tell_key, x, f, state, params)
        safe = jnp.where(jnp.isnan(f), jnp.inf, f)
        i = jnp.argmin(safe)
        better = safe[i] < best_f
        best_w = jnp.where(better, w[i], best_w)
        best_f = jnp.where(better, safe[i], best_f)
        return (state, best_w, best_f), f

    keys = jax.random.split(run_key, generations)
    init = (state, jnp.zeros(n), jnp.asarray(jnp.inf, jnp.float32))
    (_, best_w, best_f), values = jax.lax.scan(generation, init, (keys, jnp.arange(generations)))
    return best_w, best_f, values


def cmaes_search(
    objective: SearchObjective,
    *,
    budget: int = DEFAULT_BUDGET,
    population_size: int = 8,
    sigma: float = 0.5,
    bound: float = BOUND,
    seed: int = 0,
    scoring: Scoring = "vmap",
    mesh: Mesh | Literal["auto"] | None = "auto",
) -> SearchResult:
    """CMA-ES over the composition weights, one vmapped forward pass per generation.

    Args:
      objective: from `build_objective`.
      budget: evaluations; `budget // population_size` generations are run (any remainder is
        left unspent, reported by `SearchResult.evaluations`).
      population_size: P, candidates per generation.
      sigma: the initial step size (`sigma = bound / 3` keeps 3 sigma inside the box).
      bound: the box `[-bound, bound]^N`; proposals outside are folded back (`fold`).
      seed: the search's randomness.
      scoring: "vmap" (one pass per generation) or "sequential" (one pass per candidate).
      mesh: split the population over this mesh's `data` axis; "auto" uses as many local
        devices as divide P (`population_mesh`); None keeps it on one device.

    Raises:
      ConfigError: a budget smaller than one generation, P < 2, sigma <= 0, a bad bound.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> result = cmaes_search(QuadraticObjective.around([0.5, -0.5]), budget=64, population_size=8)
    >>> result.evaluations, bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    (64, True)
    """
    _check(objective, budget, bound)
    if population_size < 2:
        raise ConfigError(f"CMA-ES needs a population of at least 2, got {population_size}")
    if budget < population_size:
        raise ConfigError(f"a budget of {budget} evaluations is smaller than one generation of "
                          f"population_size={population_size}; give budget >= {population_size}"
                          " or a smaller population")
    if not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    if scoring not in ("vmap", "sequential"):
        raise ConfigError(f"scoring must be 'vmap' or 'sequential', got {scoring!r}")
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ConfigError(f"mesh must be a jax Mesh, None or 'auto', got {mesh!r}")
        mesh = population_mesh(population_size) if scoring == "vmap" else None
    generations = budget // population_size
    strategy = _strategy(population_size, objective.num_modules)
    start = time.perf_counter()
    best_w, best_f, values = _cmaes(
        objective, jax.random.key(seed), jnp.asarray(sigma, jnp.float32), strategy=strategy,
        generations=generations, bound=float(bound), scoring=scoring, mesh=mesh)
    values = np.asarray(values, np.float64).reshape(-1)
    return SearchResult("cmaes", np.asarray(best_w), float(best_f), values, values.size,
                        time.perf_counter() - start)


@jax.jit
def _value(objective: SearchObjective, weights: jax.Array) -> jax.Array:
    return objective(weights)


# nevergrad passes tol=0; scipy's COBYLA (PRIMA) replaces a non-positive final trust radius by 1e-6.
_RHOEND = 1e-6


class _BudgetSpent(Exception):
    """Raised inside scipy's loop when the evaluation budget is used up."""


def cobyla_search(
    objective: SearchObjective,
    *,
    budget: int = DEFAULT_BUDGET,
    bound: float = BOUND,
    rhobeg: float = 1.0,
) -> SearchResult:
    """The reference's optimiser: scipy COBYLA on the folded box, from 0, one pass per candidate.

    As nevergrad's NGOpt runs it for LoRAHub: `minimize(method="COBYLA", x0=0, tol=0 (1e-6),
    options={"maxiter": remaining})` with scipy's default `rhobeg` (1.0), restarted from the best
    point until the budget is spent; every proposal is folded into `[-bound, bound]` before it is
    scored. The first evaluation is `w = 0`.

    Raises:
      ConfigError: budget < 1, rhobeg <= 0, a bad bound.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> result = cobyla_search(QuadraticObjective.around([0.5, -0.5]), budget=30)
    >>> float(result.values[0]), bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    (0.5, True)
    """
    _check(objective, budget, bound)
    if not rhobeg > 0:
        raise ConfigError(f"rhobeg must be > 0, got {rhobeg}")
    n = objective.num_modules
    points: list[np.ndarray] = []
    values: list[float] = []

    def evaluate(x: np.ndarray) -> float:
        if len(values) >= budget:
            raise _BudgetSpent
        w = np.asarray(fold(jnp.asarray(x, jnp.float32), bound))
        value = float(_value(objective, jnp.asarray(w)))
        points.append(w)
        values.append(value)
        return value if np.isfinite(value) else 1e30

    start = time.perf_counter()
    x0 = np.zeros(n)
    while len(values) < budget:
        before = len(values)
        try:
            scipy.optimize.minimize(evaluate, x0, method="COBYLA", tol=_RHOEND,
                                    options={"maxiter": budget - len(values), "rhobeg": rhobeg})
        except _BudgetSpent:
            break
        if len(values) == before:  # scipy refused to evaluate anything: avoid spinning
            break
        x0 = points[int(np.nanargmin(values))]
    best = int(np.nanargmin(values))
    return SearchResult("cobyla", points[best], values[best], np.asarray(values), len(values),
                        time.perf_counter() - start)


@functools.lru_cache(maxsize=32)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # One instance per rate: jit treats the optimiser as static, hashed by identity.
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("steps", "bound", "optimizer"))
def _descend(objective: SearchObjective, start: jax.Array, *, steps: int, bound: float,
             optimizer: optax.GradientTransformation) -> tuple[jax.Array, jax.Array]:
    """Projected gradient descent: `(weights [steps, N], values [steps])` of each visited point."""

    def step(carry: tuple[jax.Array, Any], _: None):
        w, opt_state = carry
        value, grad = jax.value_and_grad(objective)(w)
        updates, opt_state = optimizer.update(grad, opt_state, w)
        new_w = jnp.clip(optax.apply_updates(w, updates), -bound, bound)
        return (new_w, opt_state), (w, value)

    _, (ws, values) = jax.lax.scan(step, (start, optimizer.init(start)), None, length=steps)
    return ws, values


def gradient_search(
    objective: SearchObjective,
    *,
    budget: int = DEFAULT_BUDGET,
    learning_rate: float = 0.05,
    bound: float = BOUND,
    start: float | None = None,
) -> SearchResult:
    """Adam on the weights through the composition (`jax.grad`), clipped to the box.

    One evaluation is one forward and one backward pass at the current point. It starts at the
    uniform average `w_i = 1/N` (`start` overrides): at `w = 0` every composed factor is zero and
    the loss is flat to first order (the delta `x (sum w_i A_i)(sum w_j B_j)` is quadratic in w),
    so descent from 0 would never move.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> f = QuadraticObjective.around([0.5, -0.5])
    >>> result = gradient_search(f, budget=100, learning_rate=0.1)
    >>> bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    True
    """
    _check(objective, budget, bound)
    if not learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
    n = objective.num_modules
    w0 = jnp.full((n,), 1.0 / n if start is None else start, jnp.float32)
    t0 = time.perf_counter()
    ws, values = _descend(objective, jnp.clip(w0, -bound, bound), steps=budget,
                          bound=float(bound), optimizer=_adam(float(learning_rate)))
    values = np.asarray(values, np.float64)
    best = int(np.nanargmin(values))
    return SearchResult("gradient", np.asarray(ws[best]), float(values[best]), values,
                        values.size, time.perf_counter() - t0)


SEARCHES: dict[str, Callable[..., SearchResult]] = {
    "cmaes": cmaes_search,
    "cobyla": cobyla_search,
    "gradient": gradient_search,
}


def search(objective: SearchObjective, method: str, **options: Any) -> SearchResult:
    """Run the search `method` ("cmaes", "cobyla", "gradient") with its keyword options."""
    if method not in SEARCHES:
        raise ConfigError(f"unknown search method {method!r}; choose one of {sorted(SEARCHES)}")
    return SEARCHES[method](objective, **options)
