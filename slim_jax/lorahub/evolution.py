"""Evolution strategies for LoRAHub's weights, one vmapped forward pass per generation.

`evolution_search` runs an evosax strategy over `w in [-bound, bound]^N`: each generation asks
for P candidates, bounces them into the box (`bounce`, as the reference bounds its weights),
scores all P in one jitted `jax.vmap`ped forward pass (`Objective.population`, split over devices
with a mesh) and tells the fitnesses back; the generations run under `jax.lax.while_loop` (which
can stop a stalled run early, for IPOP restarts), so a run is one compiled program. Strategies
(`STRATEGIES`): CMA-ES, separable CMA-ES and SNES.

Not PGPE: LoRAHub's objective is even in w at w = 0 (the composed delta `(sum w_i A_i)(sum w_i
B_i)` and the L1 term are both unchanged by w -> -w), so PGPE's antithetic pairs `0 + z`, `0 - z`
score the same and its mean gradient from the reference's start is exactly zero: it never moves.

Starts:
- "zero": the mean is 0 and the first candidate evaluated is 0 itself (the base model), as in
  the reference.
- "singles": all N single modules (`w = e_i`) are scored first in ONE vmapped call (N
  evaluations), and the strategy starts from the best of them, or from the uniform average of
  the best `top`.

Restarts (`restart_patience > 0`, IPOP-style, Auger & Hansen 2005): a run stops once its best
objective has not improved for that many generations in a row, and the strategy starts again
from the best point so far with the initial step size and twice the population, on the
evaluations the stopped run did not spend, until the budget is spent. A run that keeps improving
is never cut short, so a restarting search is plain CMA-ES until it stagnates.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES, SNES, Sep_CMA_ES
from jax.sharding import Mesh

from slim_jax.errors import ConfigError
from slim_jax.lorahub.candidates import (
    BOUND,
    DEFAULT_BUDGET,
    Scoring,
    SearchObjective,
    SearchResult,
    bounce,
    check_search,
    resolve_mesh,
    score_candidates,
    score_population,
)

Strategy = Literal["cma_es", "sep_cma_es", "snes"]
STRATEGIES: tuple[str, ...] = ("cma_es", "sep_cma_es", "snes")
Start = Literal["zero", "singles"]


@functools.lru_cache(maxsize=64)
def _strategy(name: str, population_size: int, num_dims: int) -> Any:
    # One instance per shape: jit treats the strategy as static, hashed by identity.
    solution = jnp.zeros(num_dims)
    if name == "cma_es":
        return CMA_ES(population_size=population_size, solution=solution)
    if name == "sep_cma_es":
        return Sep_CMA_ES(population_size=population_size, solution=solution)
    if name == "snes":
        return SNES(population_size=population_size, solution=solution)
    raise ConfigError(f"unknown evolution strategy {name!r}; choose one of {STRATEGIES}")


@functools.partial(jax.jit, static_argnames=("strategy", "generations", "bound", "scoring",
                                             "mesh", "evaluate_mean", "patience"))
def _evolve(objective: SearchObjective, key: jax.Array, mean: jax.Array, sigma: jax.Array, *,
            strategy: Any, generations: int, bound: float, scoring: Scoring, mesh: Mesh | None,
            evaluate_mean: bool, patience: int = 0
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One run of a strategy: `(best w [N], best objective [], values [G, P], generations run [])`.

    The run stops early, before `generations`, once its best objective has not improved for
    `patience` generations in a row (0: never); the rows of `values` after the last generation
    run are NaN.
    """
    params = strategy.default_params.replace(std_init=sigma)
    init_key, run_key = jax.random.split(key)
    state = strategy.init(init_key, mean, params)
    n = mean.shape[0]
    keys = jax.random.split(run_key, generations)

    def generation(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        state, best_w, best_f, values, index, stall = carry
        ask_key, tell_key = jax.random.split(keys[index])
        x, state = strategy.ask(ask_key, state, params)  # [P, N]
        if evaluate_mean:  # the start point itself is the first candidate evaluated
            x = x.at[0].set(jnp.where(index == 0, mean, x[0]))
        w = bounce(x, bound)
        f = score_population(objective, w, scoring=scoring, mesh=mesh)  # [P]
        safe = jnp.where(jnp.isfinite(f), f, jnp.inf)
        state, _ = strategy.tell(tell_key, x, jnp.where(jnp.isfinite(f), f, 1e30), state,
                                 params)
        i = jnp.argmin(safe)
        better = safe[i] < best_f
        best_w = jnp.where(better, w[i], best_w)
        best_f = jnp.where(better, safe[i], best_f)
        stall = jnp.where(better, 0, stall + 1)
        return state, best_w, best_f, values.at[index].set(f), index + 1, stall

    def running(carry: tuple[Any, ...]) -> jax.Array:
        index, stall = carry[-2:]
        return (index < generations) & ((patience == 0) | (stall < patience))

    values = jnp.full((generations, strategy.population_size), jnp.nan, jnp.float32)
    init = (state, jnp.zeros(n), jnp.asarray(jnp.inf, jnp.float32), values, 0, 0)
    _, best_w, best_f, values, ran, _ = jax.lax.while_loop(running, generation, init)
    return best_w, best_f, values, ran


def start_cost(num_modules: int, start: Start) -> int:
    """Evaluations a start spends before the first generation (N for "singles")."""
    return num_modules if start == "singles" else 0


def check_budget(budget: int, num_modules: int, population_size: int, start: Start) -> None:
    """A one-line `ConfigError` when `budget` cannot pay for the start and one generation.

    >>> check_budget(40, 20, 8, "singles")
    >>> try:
    ...     check_budget(24, 20, 8, "singles")
    ... except ConfigError as err:
    ...     print(str(err)[:68], "...", str(err)[-17:])
    a budget of 24 evaluations is smaller than the 'singles' start's 20 ... give budget >= 28
    """
    cost = start_cost(num_modules, start)
    if budget < cost + population_size:
        head = (f"the {start!r} start's {cost} single-module evaluations (N={num_modules}) "
                "plus " if cost else "")
        raise ConfigError(f"a budget of {budget} evaluations is smaller than {head}one generation "
                          f"of population_size={population_size}; give budget >= "
                          f"{cost + population_size}")


def evolution_search(
    objective: SearchObjective,
    *,
    strategy: Strategy = "cma_es",
    budget: int = DEFAULT_BUDGET,
    population_size: int = 8,
    sigma: float = 0.5,
    start: Start = "zero",
    top: int = 1,
    restart_patience: int = 0,
    bound: float = BOUND,
    seed: int = 0,
    scoring: Scoring = "vmap",
    mesh: Mesh | Literal["auto"] | None = "auto",
    method: str | None = None,
) -> SearchResult:
    """An evosax strategy over the composition weights, one vmapped forward pass per generation.

    Args:
      objective: from `build_objective`.
      strategy: "cma_es", "sep_cma_es" or "snes".
      budget: evaluations in all (the start's included); whole generations are run, any
        remainder is left unspent (`SearchResult.evaluations` says how many were spent).
      population_size: P, candidates per generation (of the first run, with restarts).
      sigma: the initial step size (`bound / 3` keeps 3 sigma inside the box).
      start: "zero" (mean 0, evaluated first) or "singles" (module docstring).
      top: with start="singles", start from the uniform average of the best `top` singles.
      restart_patience: restart once a run's best has not improved for this many generations,
        from the best point so far with twice the population (IPOP-style); 0 never restarts.
      bound: the box `[-bound, bound]^N`; proposals outside are bounced back (`bounce`).
      seed: the search's randomness (the same seed gives the same search).
      scoring: "vmap" (one pass per generation) or "sequential" (one pass per candidate).
      mesh: split the population over this mesh's `data` axis (and each candidate's examples
        over its `fsdp` axis); "auto" spans the local devices (`population_mesh`); None keeps
        it on one device.
      method: the name recorded in the result (default: the strategy's).

    Raises:
      ConfigError: a budget smaller than the start plus one generation (naming both), P < 2,
        sigma <= 0, a bad `top`, an unknown strategy or start.

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> result = evolution_search(QuadraticObjective.around([0.5, -0.5]), budget=64)
    >>> result.evaluations, bool(np.allclose(result.weights, [0.5, -0.5], atol=0.1))
    (64, True)
    """
    check_search(objective, budget, bound)
    n = objective.num_modules
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown evolution strategy {strategy!r}; choose one of {STRATEGIES}")
    if start not in ("zero", "singles"):
        raise ConfigError(f"start must be 'zero' or 'singles', got {start!r}")
    if population_size < 2:
        raise ConfigError(f"{strategy} needs a population of at least 2, got {population_size}")
    if not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")
    if start == "singles" and not 1 <= top <= n:
        raise ConfigError(f"top must be in 1..N={n} (singles to average), got {top}")
    if restart_patience < 0:
        raise ConfigError(f"restart_patience must be >= 0 generations, got {restart_patience}")
    check_budget(budget, n, population_size, start)
    cost = start_cost(n, start)
    resolve_mesh(mesh, population_size, scoring)  # checks mesh and scoring before any work

    values: list[np.ndarray] = []
    times: list[np.ndarray] = []
    clock = compile_seconds = 0.0  # execution seconds so far; compilation apart
    begin = time.perf_counter()
    mean = jnp.zeros(n, jnp.float32)
    best_w, best_f = np.zeros(n, np.float32), np.inf
    if start == "singles":
        eye = jnp.eye(n, dtype=jnp.float32)
        t0 = time.perf_counter()
        score = score_candidates.lower(objective, eye, scoring=scoring).compile()
        t1 = time.perf_counter()
        singles = np.asarray(jax.block_until_ready(score(objective, eye)), np.float64)  # ONE call
        clock, compile_seconds = time.perf_counter() - t1, t1 - t0
        values.append(singles)
        times.append(np.full(n, clock))
        order = np.argsort(np.where(np.isfinite(singles), singles, np.inf), kind="stable")
        best_w, best_f = np.eye(n, dtype=np.float32)[order[0]], float(singles[order[0]])
        mean = jnp.asarray(np.eye(n, dtype=np.float32)[order[:top]].mean(0))
    evaluate_mean = start == "zero" or top > 1

    key = jax.random.key(seed)
    left, population = budget - cost, population_size
    while left >= population:
        generations = left // population
        key, run_key = jax.random.split(key)
        args = (objective, run_key, mean, jnp.asarray(sigma, jnp.float32))
        static = dict(strategy=_strategy(strategy, population, n), generations=generations,
                      bound=float(bound), scoring=scoring,
                      mesh=resolve_mesh(mesh, population, scoring), evaluate_mean=evaluate_mean,
                      patience=restart_patience)
        t0 = time.perf_counter()
        compiled = _evolve.lower(*args, **static).compile()
        t1 = time.perf_counter()
        w, f, run_values, ran = jax.block_until_ready(compiled(*args))
        t2 = time.perf_counter()
        ran = int(ran)
        compile_seconds += t1 - t0
        values.append(np.asarray(run_values, np.float64)[:ran].reshape(-1))  # [ran * P]
        # A run is one program whose generations cost the same: generation g's values are known
        # (g + 1) / ran of the way through the run's execution.
        steps = clock + (t2 - t1) * np.arange(1, ran + 1) / ran
        times.append(np.repeat(steps, population))
        clock = float(steps[-1])
        if float(f) < best_f:
            best_w, best_f = np.asarray(w), float(f)
        left -= ran * population
        if restart_patience == 0:
            break
        mean, evaluate_mean = jnp.asarray(best_w), False
        population *= 2
    all_values = np.concatenate(values)
    return SearchResult(method or strategy, np.asarray(best_w, np.float32), float(best_f),
                        all_values, all_values.size, time.perf_counter() - begin,
                        np.concatenate(times), compile_seconds)
