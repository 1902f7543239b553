"""Searches for LoRAHub's composition weights `w in [-bound, bound]^N` (LORAHUB.md s4).

Every search takes an objective (`build_objective`) and keyword settings, spends at most
`budget` evaluations, and returns a `SearchResult`: the best candidate ever evaluated, its
objective, and the objective of every evaluation in order. `SEARCHES` names them all, with the
settings each takes; `search(objective, name, **settings)` runs one by name:

- "cmaes", "sep_cmaes", "snes": evosax strategies from w = 0, a generation = one jitted,
  vmapped forward pass over the population, the whole search one compiled `lax.while_loop`
  over the generations (`slim_jax.lorahub.evolution`).
- "singles_cmaes": all N single modules scored in one vmapped call, then CMA-ES from the best
  (or from the average of the best `top`).
- "ipop_cmaes": CMA-ES restarted, with twice the population, from the best point whenever a run
  has not improved for `restart_patience` generations.
- "cobyla": the reference's optimiser (`cobyla_search`), one forward pass per candidate.
- "gradient": Adam on `w` through the composition (`jax.grad`), projected onto the box.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from slim_jax.errors import ConfigError
from slim_jax.lorahub.candidates import (
    BOUND,
    DEFAULT_BUDGET,
    SearchObjective,
    SearchResult,
    bounce,
    check_search,
    population_mesh,
    score_candidates,
    score_population,
)
from slim_jax.lorahub.evolution import STRATEGIES, Start, check_budget, evolution_search

__all__ = ["BOUND", "DEFAULT_BUDGET", "DEFAULT_SEARCH", "SEARCHES", "STRATEGIES", "Search",
           "SearchObjective", "SearchResult", "bounce", "check_budget", "cmaes_search",
           "cobyla_search", "evolution_search", "gradient_search", "population_mesh",
           "score_candidates", "score_population", "search"]


def cmaes_search(objective: SearchObjective, **settings: Any) -> SearchResult:
    """CMA-ES from w = 0: `evolution_search(objective, strategy="cma_es", **settings)`.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> result = cmaes_search(QuadraticObjective.around([0.5, -0.5]), budget=64, population_size=8)
    >>> result.method, result.evaluations, bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    ('cmaes', 64, True)
    """
    return evolution_search(objective, strategy="cma_es", method="cmaes", **settings)


@jax.jit
def _value(objective: SearchObjective, weights: jax.Array) -> jax.Array:
    return objective(weights)


class _BudgetSpent(Exception):
    """Raised inside scipy's loop when the evaluation budget is used up."""


def cobyla_search(
    objective: SearchObjective,
    *,
    budget: int = DEFAULT_BUDGET,
    bound: float = BOUND,
    rhobeg: float | None = None,
) -> SearchResult:
    """The reference's optimiser, as nevergrad's NGOpt runs it for LoRAHub.

    nevergrad holds `w` as `ng.p.Array(init=0, lower=-bound, upper=bound)`: standardised data
    `x` with `w = bounce(sigma * x)`, sigma = (upper - lower) / 6 = bound / 3 = 0.5, and its
    COBYLA runs `scipy.optimize.minimize(f, x0, method="COBYLA", tol=0, options={"maxiter":
    remaining})` on `x` from 0 with scipy's default `rhobeg` = 1, restarting from the best
    run's `res.x` until the budget is spent. So the first evaluation is `w = 0` and the second
    `w = 0.5 e_1`; this does exactly that (`rhobeg`, in units of w, is that sigma: the first step
    in weight space). One candidate per forward pass, driven from Python.

    Which scipy reproduces the reference's trajectory: scipy < 1.16 (the Fortran COBYLA that the
    reference ran with) exactly. scipy >= 1.16 replaced it with PRIMA's COBYLA, which makes the
    same N + 2 first evaluations (w = 0, then `0.5 e_j` from the best vertex so far, then a step
    of 0.5 against the linear model's gradient) and then takes other steps: on LoRAHub's problem
    the two part after about 21 evaluations (issue 12). PRIMA also replaces `tol=0` by 1e-6.

    Args:
      objective: from `build_objective`.
      budget: evaluations.
      bound: the box; proposals are bounced into it (`bounce`).
      rhobeg: the first step in weight space; None: `bound / 3` (the reference's 0.5).

    Raises:
      ConfigError: budget < 1, rhobeg <= 0, a bad bound.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> result = cobyla_search(QuadraticObjective.around([0.5, -0.5]), budget=30)
    >>> result.values[:2].tolist(), bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    ([0.5, 0.25], True)
    """
    check_search(objective, budget, bound)
    scale = bound / 3 if rhobeg is None else rhobeg
    if not scale > 0:
        raise ConfigError(f"rhobeg must be > 0, got {rhobeg}")
    n = objective.num_modules
    t0 = time.perf_counter()
    value = _value.lower(objective, jnp.zeros(n, jnp.float32)).compile()
    compile_seconds = time.perf_counter() - t0
    points: list[np.ndarray] = []
    values: list[float] = []
    times: list[float] = []
    begin = time.perf_counter()

    def evaluate(x: np.ndarray) -> float:
        if len(values) >= budget:
            raise _BudgetSpent
        w = bounce(scale * np.asarray(x, np.float64), bound)  # nevergrad's float64 path
        result = float(value(objective, jnp.asarray(w, jnp.float32)))
        points.append(w.astype(np.float32))
        values.append(result)
        times.append(time.perf_counter() - begin)
        return result if np.isfinite(result) else 1e30

    x0, best = np.zeros(n), np.inf
    with warnings.catch_warnings():  # PRIMA warns that tol=0 becomes 1e-6: as the reference
        warnings.filterwarnings("ignore", message=".*RHOEND", category=UserWarning)
        while len(values) < budget:
            before = len(values)
            try:
                res = scipy.optimize.minimize(evaluate, x0, method="COBYLA", tol=0,
                                              options={"maxiter": budget - len(values)})
            except _BudgetSpent:
                break
            if len(values) == before:  # scipy refused to evaluate anything: avoid spinning
                break
            if res.fun < best:
                best, x0 = res.fun, np.asarray(res.x, np.float64)
    i = int(np.nanargmin(values))
    return SearchResult("cobyla", points[i], values[i], np.asarray(values), len(values),
                        time.perf_counter() - t0, np.asarray(times), compile_seconds)


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
    check_search(objective, budget, bound)
    if not learning_rate > 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
    n = objective.num_modules
    w0 = jnp.clip(jnp.full((n,), 1.0 / n if start is None else start, jnp.float32), -bound, bound)
    static = dict(steps=budget, bound=float(bound), optimizer=_adam(float(learning_rate)))
    t0 = time.perf_counter()
    compiled = _descend.lower(objective, w0, **static).compile()
    t1 = time.perf_counter()
    ws, values = jax.block_until_ready(compiled(objective, w0))
    t2 = time.perf_counter()
    values = np.asarray(values, np.float64)
    best = int(np.nanargmin(values))
    # One program of equal steps: step k's value is known (k + 1) / budget of the way through.
    times = (t2 - t1) * np.arange(1, budget + 1) / budget
    return SearchResult("gradient", np.asarray(ws[best]), float(values[best]), values,
                        values.size, t2 - t0, times, t1 - t0)


@dataclasses.dataclass(frozen=True)
class Search:
    """One named search: the function, the settings (keyword names) it takes, and for an
    evolution strategy its start ("zero" or "singles", whose cost `check_budget` checks)."""

    run: Callable[..., SearchResult]
    settings: tuple[str, ...]
    start: Start | None = None


_EVOLUTION = ("budget", "bound", "population_size", "sigma", "seed")
SEARCHES: dict[str, Search] = {
    "cmaes": Search(cmaes_search, _EVOLUTION, "zero"),
    "sep_cmaes": Search(functools.partial(evolution_search, strategy="sep_cma_es",
                                          method="sep_cmaes"), _EVOLUTION, "zero"),
    "snes": Search(functools.partial(evolution_search, strategy="snes", method="snes"),
                   _EVOLUTION, "zero"),
    "singles_cmaes": Search(functools.partial(evolution_search, strategy="cma_es",
                                              start="singles", method="singles_cmaes"),
                            (*_EVOLUTION, "top"), "singles"),
    "ipop_cmaes": Search(functools.partial(evolution_search, strategy="cma_es",
                                           restart_patience=10, method="ipop_cmaes"),
                         (*_EVOLUTION, "restart_patience"), "zero"),
    "cobyla": Search(cobyla_search, ("budget", "bound")),
    "gradient": Search(gradient_search, ("budget", "bound", "learning_rate")),
}
# The search study (experiments/RESULTS.md, "Which search at 40 evaluations"): on the 16 ADAPT
# objectives of the cpu preset's eight targets (4 BBH, 4 unseen T0) and two module draws, Adam
# through the composition had the lowest objective at 40 evaluations (first on 12 of 16), at 200,
# and at equal wall time; then CMA-ES from the best single module and COBYLA; plain CMA-ES from
# w = 0 did not win at this budget. The vmapped CMA-ES ("cmaes", "singles_cmaes") stays the
# choice for accelerators, where a generation is one batched pass.
DEFAULT_SEARCH = "gradient"


def search(objective: SearchObjective, method: str, **settings: Any) -> SearchResult:
    """Run the search named `method` (a key of `SEARCHES`) with its keyword settings.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> search(QuadraticObjective.around([0.2, 0.1]), "snes", budget=16).evaluations
    16
    """
    if method not in SEARCHES:
        raise ConfigError(f"unknown search method {method!r}; choose one of {sorted(SEARCHES)}")
    return SEARCHES[method].run(objective, **settings)
