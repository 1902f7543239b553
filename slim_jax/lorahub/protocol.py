"""LoRAHub's BIG-Bench Hard protocol (LORAHUB.md s5): module draws, runs, baselines, scores.

Per task: the K ADAPT examples (`BBHTask.adapt_split`: the reference's seed-42 shuffle, kept out
of the test set), then
- baselines: zero-shot (the base model), in-context learning with the same K examples in the
  prompt;
- for each run s = 1..R, the modules of `module_draws` (the reference's `random.seed(s);
  random.sample(names, 20)`): the uniform average `w_i = 1/N`, the best single module by ADAPT
  objective, LoRAHub's search (`ProtocolConfig.search`) and the searches compared with it
  (`compare`, default the reference's COBYLA) over the same objective and budget; the found
  weights are merged once and the test set answered greedily.
Scores are exact match x 100 (`slim_jax.data.exact_match_score`).

Attaching a library puts `LoRALinear` layers on the model's adapted layers in place; until a
composition is merged they compute the base function (zero B), so the model stays usable.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.data import BBHExample, Example, exact_match_score
from slim_jax.errors import ConfigError
from slim_jax.lorahub.library import AttachedLibrary, LoRAModule, ModuleLibrary
from slim_jax.lorahub.objective import (
    L1_COEFF,
    LOSS_MODES,
    MAX_LENGTH,
    LossMode,
    Objective,
    build_objective,
    objective_layout,
)
from slim_jax.lorahub.predict import greedy_answers
from slim_jax.lorahub.search import (
    BOUND,
    DEFAULT_SEARCH,
    SEARCHES,
    check_budget,
    score_candidates,
    search,
)
from slim_jax.tokenizer import Tokenizer

BASELINES = ("zero_shot", "icl")
RUN_BASELINES = ("uniform", "best_single")
SHOWN = 3  # test answers kept per method, for reading


class TargetTask(Protocol):
    """What `run_bbh_task` needs of a task: `slim_jax.data.BBHTask` (BIG-Bench Hard) and
    `slim_jax.data.T0Target` (a T0 template left out of the module library) both are one."""

    name: str

    def adapt_split(self, k: int, seed: int
                    ) -> tuple[tuple[BBHExample, ...], tuple[BBHExample, ...]]:
        """`(adapt, test)`: the K ADAPT examples and the disjoint examples scored."""
        ...

    def prompt(self, question: str) -> str:
        """The zero-shot prompt of `question`."""
        ...

    def icl_prompt(self, shots: Sequence[BBHExample], question: str) -> str:
        """The in-context prompt of `question` with `shots` in front."""
        ...

    def as_examples(self, examples: Sequence[BBHExample],
                    shots: Sequence[BBHExample] = ()) -> list[Example]:
        """Prompt/target pairs for the objective's tokenisation."""
        ...


def module_draws(names: Sequence[str], runs: int = 5, per_run: int = 20) -> list[list[str]]:
    """The modules of runs 1..`runs`: `random.seed(s); random.sample(names, per_run)`.

    The reference seeds Python's global generator; `random.Random(s)` draws the same.

    >>> ids = [f"m{i}" for i in range(196)]
    >>> [int(n[1:]) for n in module_draws(ids, runs=1)[0][:4]]
    [34, 145, 195, 16]
    """
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    if not 1 <= per_run <= len(names):
        raise ConfigError(f"cannot draw {per_run} modules per run from {len(names)} modules; "
                          f"choose 1 <= modules_per_run <= {len(names)}")
    return [random.Random(seed).sample(list(names), per_run) for seed in range(1, runs + 1)]


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """The algorithmic settings of a LoRAHub BBH run.

    Attributes:
      k: ADAPT examples per task (5).
      adapt_seed: seed of the ADAPT draw (42).
      runs: module draws, s = 1..runs (5).
      modules_per_run: N modules per draw (20).
      search: LoRAHub's search, a name of `slim_jax.lorahub.SEARCHES` ("cmaes", "cobyla",
        "singles_cmaes", ...).
      compare: searches run beside it on every draw at the same budget (the reference's
        "cobyla" by default; empty for none).
      baselines: which of zero_shot, icl, uniform, best_single to compute.
      budget: objective evaluations per search (40, the reference's).
      population_size: candidates per generation of the evolution strategies.
      sigma: their initial step size (0.3: in the search study, experiments/RESULTS.md, it was
        the best step at 40 evaluations for CMA-ES at every population, from w = 0 and from the
        best single module; 0.5 and 1.0 often never left w = 0).
      top: "singles_cmaes" starts from the average of the best `top` single modules.
      restart_patience: "ipop_cmaes" restarts, with twice the population, once a run's best has
        not improved for this many generations (0: never; 10, the constant part of Hansen's
        TolHistFun stopping rule: a shorter patience cut runs that were still converging).
      learning_rate: the gradient search's Adam step.
      bound: the box of the weights (1.5).
      objective_mode: "compat" (the reference's loss) or "mean".
      l1_coeff: the L1 weight (0.05).
      batch_size: ADAPT examples per objective batch; None: all K in one.
      max_length: truncation of inputs and targets (2048; decoder-only: also the positions).
      max_new_tokens: greedy decoding length (256).
      generation_batch_size: test prompts decoded together.
      max_test_examples: score on the first this many test examples (None: all).
      seed: added to the run index for the searches' seeds.
    """

    k: int = 5
    adapt_seed: int = 42
    runs: int = 5
    modules_per_run: int = 20
    search: str = DEFAULT_SEARCH
    compare: tuple[str, ...] = ("cobyla",)
    baselines: tuple[str, ...] = (*BASELINES, *RUN_BASELINES)
    budget: int = 40
    population_size: int = 8
    sigma: float = 0.3
    top: int = 1
    restart_patience: int = 10
    learning_rate: float = 0.05
    bound: float = BOUND
    objective_mode: LossMode = "compat"
    l1_coeff: float = L1_COEFF
    batch_size: int | None = None
    max_length: int = MAX_LENGTH
    max_new_tokens: int = 256
    generation_batch_size: int = 64
    max_test_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, methods in (("search", (self.search,)), ("compare", self.compare)):
            unknown = [m for m in methods if m not in SEARCHES]
            if unknown:
                raise ConfigError(f"names unknown search method(s) {unknown}; choose from "
                                  f"{sorted(SEARCHES)}", field=name)
        bad = [b for b in self.baselines if b not in (*BASELINES, *RUN_BASELINES)]
        if bad:
            raise ConfigError(f"names unknown baseline(s) {bad}; choose from "
                              f"{[*BASELINES, *RUN_BASELINES]}", field="baselines")
        if self.objective_mode not in LOSS_MODES:
            raise ConfigError(f"must be one of {LOSS_MODES}, got {self.objective_mode!r}",
                              field="objective_mode")
        for name in ("k", "budget", "runs", "modules_per_run", "max_length", "max_new_tokens",
                     "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for method in self.methods:  # a budget below a start's cost: named before any work
            if SEARCHES[method].start is not None:
                try:
                    check_budget(self.budget, self.modules_per_run, self.population_size,
                                 SEARCHES[method].start)
                except ConfigError as err:
                    raise ConfigError(f"is too small for {method!r}: {err}",
                                      field="budget") from err
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"must be >= 1 or None (all K), got {self.batch_size}",
                              field="batch_size")
        if self.max_test_examples is not None and self.max_test_examples < 1:
            raise ConfigError(f"must be >= 1 or None, got {self.max_test_examples}",
                              field="max_test_examples")

    @property
    def methods(self) -> tuple[str, ...]:
        """Every search run on a draw: `search` first, then `compare` (each once)."""
        return tuple(dict.fromkeys((self.search, *self.compare)))

    def search_options(self, method: str, run: int) -> dict[str, Any]:
        """Keyword settings of `search(objective, method, ...)` for run `run` (1-based): the
        fields named in `SEARCHES[method].settings`, the seed offset by the run."""
        fields = {**dataclasses.asdict(self), "seed": self.seed + run}
        return {name: fields[name] for name in SEARCHES[method].settings}


@dataclasses.dataclass
class RunResult:
    """One module draw of one task.

    Attributes:
      run: s (1-based).
      modules: the drawn module names, in weight order.
      scores: exact match x 100 per method ("uniform", "best_single", "cmaes", ...).
      objectives: the ADAPT objective of each method's weights.
      weights: each method's weights.
      histories: each search's best-so-far objective after every evaluation.
      seconds: each search's wall time.
      best_single: the name of the best single module.
      answers: each method's first few test answers, for reading what the model says.
    """

    run: int
    modules: list[str]
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    objectives: dict[str, float] = dataclasses.field(default_factory=dict)
    weights: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    histories: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    best_single: str | None = None
    answers: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskResult:
    """All scores of one BBH task.

    Attributes:
      task: the task name.
      num_adapt, num_test: examples used for the objective and for scoring.
      baselines: exact match x 100 of "zero_shot" and "icl".
      runs: one `RunResult` per module draw.
      examples: a few (prompt, target, zero-shot and in-context answer) records, for reading
        what the models say.
    """

    task: str
    num_adapt: int
    num_test: int
    baselines: dict[str, float]
    runs: list[RunResult]
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def method_scores(self, method: str) -> list[float]:
        """The scores of a per-run method over the runs."""
        return [r.scores[method] for r in self.runs if method in r.scores]


Progress = Callable[[str], None]


def run_bbh_task(
    task: TargetTask,
    model: nnx.Module,
    tokenizer: Tokenizer,
    modules: Mapping[str, LoRAModule],
    draws: Sequence[Sequence[str]],
    config: ProtocolConfig = ProtocolConfig(),
    *,
    progress: Progress | None = None,
    done: TaskResult | None = None,
    save: Callable[[TaskResult], None] | None = None,
) -> TaskResult:
    """LoRAHub on one BBH task: baselines, then every draw's baselines and searches.

    Resumable by units of task x run: `save` gets the result so far after the task's baselines
    and after each run; given back as `done`, those parts are kept and not redone (each run's
    searches are seeded by its index, so the rest, and the whole result, equal an uninterrupted
    call's).

    Args:
      task: from `slim_jax.data.load_bbh`, or a `slim_jax.data.T0Target` (`TargetTask`).
      model: the base `Llama` or `T5`; LoRA layers are attached to it in place (module
        docstring).
      tokenizer: its tokenizer.
      modules: every module a draw names, by name.
      draws: the module names of each run (`module_draws`).
      config: the protocol's settings.
      progress: called with a short label after each step (a progress bar's update); also for
        the steps `done` already holds.
      done: the last result `save` got from an interrupted call on this task with the same
        draws and config: its baselines and finished runs are kept.
      save: called with the result so far (the runs finished) after each unit.

    Raises:
      ConfigError: K larger than the task's examples (naming the task), a draw naming a module
        not in `modules`, `done` of another task or other draws.
      LibraryError: modules that cannot be composed (naming the odd one).
    """
    note = progress or (lambda label: None)
    adapt, test = task.adapt_split(config.k, config.adapt_seed)
    if config.max_test_examples is not None:
        test = test[:config.max_test_examples]
    if not test:
        raise ConfigError(f"task {task.name!r} has no test example left after the "
                          f"{config.k} ADAPT examples")
    targets = [e.target for e in test]
    answer = _answerer(tokenizer, config, targets)
    zero_shot_prompts = [task.prompt(e.input) for e in test]

    if done is not None and done.task != task.name:
        raise ConfigError(f"done holds task {done.task!r}, not {task.name!r}")
    baselines: dict[str, float] = dict(done.baselines) if done is not None else {}
    shown: list[dict[str, str]] = [{"prompt": p, "target": t}
                                   for p, t in zip(zero_shot_prompts[:SHOWN], targets[:SHOWN],
                                                   strict=False)]
    if done is not None:  # the baselines are its first unit
        shown = done.examples
        for label, key in (("zero-shot", "zero_shot"), ("in-context", "icl")):
            if key in config.baselines:
                note(label)
    if done is None and "zero_shot" in config.baselines:
        baselines["zero_shot"], said = answer(model, zero_shot_prompts)
        for record, text in zip(shown, said, strict=False):
            record["zero_shot"] = text
        note("zero-shot")
    if done is None and "icl" in config.baselines:
        baselines["icl"], said = answer(model, [task.icl_prompt(adapt, e.input) for e in test])
        for record, text in zip(shown, said, strict=False):
            record["icl"] = text
        note("in-context")

    layout = objective_layout(model, tokenizer, config.max_length)
    examples = task.as_examples(adapt)
    runs = list(done.runs) if done is not None else []
    if save is not None and done is None:
        save(TaskResult(task.name, len(adapt), len(test), baselines, [], shown))
    for run, names in enumerate(draws, start=1):
        if run <= len(runs):  # finished before: kept
            if runs[run - 1].modules != list(names):
                raise ConfigError(f"done's run {run} composes other modules than its draw")
            for name in runs[run - 1].scores:
                note(f"run {run} {name}")
            continue
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"run {run} draws modules that were not loaded: {missing[:5]}")
        attached = ModuleLibrary.from_modules([modules[n] for n in names]).attach(model)
        objective = build_objective(attached, examples, layout, batch_size=config.batch_size,
                                    mode=config.objective_mode, l1_coeff=config.l1_coeff)
        result = RunResult(run, list(names))
        candidates = _search_weights(objective, result, config)
        for name, w in candidates.items():
            result.scores[name], said = answer(_merged(attached, w), zero_shot_prompts)
            result.answers[name] = said[:SHOWN]
            note(f"run {run} {name}")
        runs.append(result)
        if save is not None:
            save(TaskResult(task.name, len(adapt), len(test), baselines, list(runs), shown))
    return TaskResult(task.name, len(adapt), len(test), baselines, runs, shown)


def _search_weights(objective: Objective, result: RunResult, config: ProtocolConfig
                    ) -> dict[str, np.ndarray]:
    """The weights of every per-run method (baselines, then searches), recording objectives,
    weights and histories in `result`."""
    n = objective.num_modules
    candidates: dict[str, np.ndarray] = {}
    if any(b in config.baselines for b in RUN_BASELINES):
        # One vmapped pass scores every single module and the uniform average.
        grid = np.concatenate([np.eye(n, dtype=np.float32),
                               np.full((1, n), 1.0 / n, np.float32)])
        values = np.asarray(score_candidates(objective, jnp.asarray(grid)))
        chosen = {"uniform": n, "best_single": int(np.argmin(values[:n]))}
        for name in RUN_BASELINES:
            if name in config.baselines:
                candidates[name] = grid[chosen[name]]
                result.objectives[name] = float(values[chosen[name]])
                result.weights[name] = grid[chosen[name]].tolist()
        if "best_single" in config.baselines:
            result.best_single = result.modules[chosen["best_single"]]
    for method in config.methods:
        found = search(objective, method, **config.search_options(method, result.run))
        candidates[method] = found.weights
        result.objectives[method] = found.objective
        result.weights[method] = np.asarray(found.weights).tolist()
        result.histories[method] = found.history.tolist()
        result.seconds[method] = found.seconds
    return candidates


def _merged(attached: AttachedLibrary, weights: np.ndarray) -> nnx.Module:
    return attached.merged_model(jnp.asarray(weights, jnp.float32))


def _answerer(tokenizer: Tokenizer, config: ProtocolConfig, targets: list[str]
              ) -> Callable[[nnx.Module, list[str]], tuple[float, list[str]]]:
    """`answer(model, prompts) -> (exact match x 100, the answers)`."""

    def answer(model: nnx.Module, prompts: list[str]) -> tuple[float, list[str]]:
        predictions = greedy_answers(model, tokenizer, prompts,
                                     max_new_tokens=config.max_new_tokens,
                                     batch_size=config.generation_batch_size,
                                     max_length=config.max_length)
        return exact_match_score(predictions, targets), predictions

    return answer


def steps_per_task(config: ProtocolConfig) -> int:
    """How many `progress` notes `run_bbh_task` makes (for a progress bar's total)."""
    per_run = len([b for b in config.baselines if b in RUN_BASELINES]) + len(config.methods)
    return len([b for b in config.baselines if b in BASELINES]) + config.runs * per_run

