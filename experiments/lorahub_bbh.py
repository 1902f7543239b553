"""`python -m experiments.lorahub_bbh`: LoRAHub on BIG-Bench Hard, with a choice of searches.

The targets are BBH tasks (`--bbh.tasks`) and, beside them, T0 classification templates left out
of the module library (`--t0.tasks`, `slim_jax.data.T0Target`: K examples from the template's
train part, scored on its test split, or on the rest of the train part with `--t0.validation
true` for pilots; results.md gives each one's chance line). A target that is one of the library's
tasks is refused. For every target (LORAHUB.md s5): the K=5 ADAPT examples (seed 42, kept out
of the test set), zero-shot and in-context baselines, then five runs, run s composing the 20
modules drawn by
`random.seed(s); random.sample(names, 20)`: the uniform average, the best single module, and
each search (`--protocol.search`, default Adam through the composition, and COBYLA as the
reference runs it) at the same
budget; the found weights are merged once and the test set answered greedily (up to 256 new
tokens; a decoder-only model's prompt is cut from the left so prompt and answer fit its
positions). Scores are exact match x 100. The run folder:

    <out>/command.txt, config.json     the exact command, the full resolved config
    <out>/draws.json                   the modules each run composes
    <out>/results.md                   the per-task table with the average over tasks
    <out>/results.json                 every run's modules, weights, objectives, histories
    <out>/search_progress.png          best objective against evaluations, per search
    <out>/tasks/<task>.json            one finished task's results (written when it finishes)
    <out>/tasks/<task>.partial.json    the task in progress: its baselines and finished runs
    <out>/FINISHED                     written last, when every task is done

Stop and resume: SIGTERM, SIGINT or SIGUSR1 stops with the finished tasks and the finished runs
of the task in progress saved (and, while modules are being trained, the module in training); one
line names what is saved and the command that resumes. The same command with the same `--out`
keeps the finished tasks and runs (units of task x run, each recorded atomically when it
finishes) and continues the interrupted task with its next run (same seeds, same numbers as an
uninterrupted run). A finished `--out` is refused unless `--overwrite`.

The cpu preset (default) uses the TinyStories model with modules from
`python -m experiments.train_lora_modules` (trained first, with a line saying so, when the module
folder holds none or an unfinished set) and
draws over those modules in LoRAHub's list order; its targets are four BBH tasks and four T0
templates (`CPU_T0_TARGETS`); `--bbh.tasks all` runs all 27 BBH tasks.

Examples:
    python -m experiments.lorahub_bbh                               # the cpu preset
    python -m experiments.lorahub_bbh --bbh.tasks navigate --protocol.runs 2
    python -m experiments.lorahub_bbh --protocol.search cmaes --protocol.population-size 16
    python -m experiments.lorahub_bbh --protocol.compare cobyla,gradient --protocol.budget 80
    python -m experiments.lorahub_bbh --preset flan-t5-large --modules.dir /ckpt/lorahub_modules
    python -m experiments.lorahub_bbh --help                        # every field and default
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flax import nnx
from tqdm.auto import tqdm

from experiments import run_state
from experiments.base_model import load_base, model_overrides
from experiments.cli import parse_config, run_command
from experiments.presets.lorahub import PRESETS, LoRAHubExperiment, UpstreamExperiment
from experiments.run_folder import resolve_out
from experiments.train_lora_modules import chosen_tasks, finished_set, train_modules
from slim_jax.data import load_bbh, load_t0_target
from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.lorahub.library import LoRAModule, check_modules, find_module, load_module
from slim_jax.lorahub.protocol import (
    RunResult,
    TargetTask,
    TaskResult,
    module_draws,
    run_bbh_task,
    steps_per_task,
)
from slim_jax.lorahub.report import plot_search_progress, results_json, results_table
from slim_jax.lorahub.upstream import read_module_ids, task_of
from slim_jax.settings import enable_compilation_cache
from slim_jax.train.workers import Stopped, StopSignals

PROG = "python -m experiments.lorahub_bbh"
DRAWS = "draws.json"


def parse_cli(argv: Sequence[str] | None = None) -> LoRAHubExperiment:
    """The config from the command line: `--preset` first, then field overrides."""
    return parse_config(PROG, __doc__, {name: pair[0] for name, pair in PRESETS.items()}, argv)


def load_tasks(config: LoRAHubExperiment) -> dict[str, TargetTask]:
    """The BBH tasks, then the T0 targets, each checked to have more than K examples (before
    any other work).

    Raises:
      DataError: an unknown task name (listing the valid ones), missing files, a T0 template
        that is not a classification task.
      ConfigError: K at least a task's number of examples; no task at all; a name twice.
    """
    tasks: dict[str, TargetTask] = {}
    if config.bbh.tasks:
        names = None if tuple(config.bbh.tasks) == ("all",) else config.bbh.tasks
        tasks.update(load_bbh(names, config.data_dir, source=config.bbh.source))
    for name in config.t0.tasks:
        if name in tasks:
            raise ConfigError(f"--t0.tasks names {name!r} twice (or as a BBH task too)")
        tasks[name] = load_t0_target(name, config.data_dir, validation=config.t0.validation)
    if not tasks:
        raise ConfigError("no task to run: give --bbh.tasks or --t0.tasks")
    for task in tasks.values():
        task.adapt_split(config.protocol.k, config.protocol.adapt_seed)
    return tasks


def check_unseen(config: LoRAHubExperiment, library: Sequence[str]) -> None:
    """Refuse a T0 target that is one of the module library's tasks: a target must be unseen.

    Raises:
      ConfigError: naming the target.
    """
    seen = [name for name in config.t0.tasks if name in set(library)]
    if seen:
        raise ConfigError(f"--t0.tasks: {seen[0]!r} is one of the module library's tasks; an "
                          "unseen target must be left out of the library (drop it from "
                          "--t0.tasks, or from the modules)")


def module_pool(config: LoRAHubExperiment) -> tuple[list[str], dict[str, str]]:
    """The names drawn from, in LoRAHub's order, and each name's module id.

    With `modules.local_only` the pool is the modules present in `modules.dir`; otherwise every
    id of the id file.
    """
    ids = read_module_ids(config.modules.ids_file, config.data_dir)
    if not config.modules.local_only:
        return ids, {i: i for i in ids}
    root = Path(config.modules.dir or ".").expanduser()
    present = [task_of(i) for i in ids if (root / task_of(i) / "adapter_config.json").is_file()]
    return present, {task_of(i): i for i in ids}


def ensure_modules(config: LoRAHubExperiment) -> list[str] | None:
    """Train the upstream modules first when the cpu-style module folder holds none, or holds
    a set that `train_lora_modules` left unfinished; says so in one line first. Returns what is
    saved when a stop signal stopped the training, else None.

    Raises:
      CheckpointError: no module there and `--modules.train-missing false`.
    """
    if not config.modules.local_only or config.modules.dir is None:
        return None
    root = Path(config.modules.dir).expanduser().resolve()
    unfinished = (root / "config.json").is_file() and not finished_set(root)
    if module_pool(config)[0] and not unfinished:
        return None
    if not config.modules.train_missing:
        raise CheckpointError(
            f"--modules.dir {root} holds no {'finished set of ' if unfinished else ''}LoRA "
            f"modules; train them with `python -m experiments.train_lora_modules --out {root}`"
            " or pass --modules.train-missing true")
    upstream = UpstreamExperiment(
        preset=config.preset, out=str(root), data_dir=config.data_dir,
        progress=config.progress, compilation_cache=config.compilation_cache,
        model=config.model, upstream=config.upstream)
    count = len(chosen_tasks(config.upstream, config.data_dir))
    print(f"{PROG}: --modules.dir {root} holds "
          f"{'an unfinished set of' if unfinished else 'no'} LoRA modules: training {count} "
          f"there first (as python -m experiments.train_lora_modules --out {root} does)",
          flush=True)
    return train_modules(upstream)  # a fresh copy of the base model: the one used here stays plain


def load_modules(config: LoRAHubExperiment, model: nnx.Module, names: Sequence[str],
                 ids: dict[str, str]) -> dict[str, LoRAModule]:
    """Every drawn module, from the module folder or the hub, checked against the model."""
    modules = {}
    for name in tqdm(names, desc="load modules", disable=not config.progress, leave=False):
        folder = find_module(ids.get(name, name), config.modules.dir,
                             hub=not config.modules.local_only,
                             allow_pickle=config.modules.allow_pickle)
        modules[name] = load_module(folder, model, name=name,
                                    allow_pickle=config.modules.allow_pickle)
    return modules


def run_folder(config: LoRAHubExperiment) -> Path:
    """`--out`, or a new timestamped folder under `runs/lorahub_bbh`."""
    return resolve_out(config.out, "lorahub_bbh", config.preset)


def task_file(out: Path, task: str, *, partial: bool = False) -> Path:
    """A finished task's record, or (`partial`) the baselines and finished runs of the task in
    progress: the units of task x run that a rerun keeps."""
    return out / "tasks" / f"{task}{'.partial' if partial else ''}.json"


def task_result(record: dict) -> TaskResult:
    """A `TaskResult` read back from its JSON record (`dataclasses.asdict`)."""
    runs = [RunResult(**run) for run in record["runs"]]
    return TaskResult(**{**record, "runs": runs})


def write_results(out: Path, results: list[TaskResult], config: LoRAHubExperiment,
                  command: str, seconds: float, tasks: dict[str, TargetTask]) -> None:
    """results.md, results.json and the search-progress plot (rewritten after every task);
    `tasks` as `load_tasks` gave them (the T0 targets' chance lines)."""
    table = results_table(results)
    p = config.protocol
    t0 = config.t0
    chance = ""
    if t0.tasks:
        scores = ", ".join(
            f"{name} {tasks[name].majority_score(p.k, p.adapt_seed, p.max_test_examples):.1f}"
            for name in t0.tasks)
        scored = ("validation items (the train part outside the ADAPT set)" if t0.validation
                  else "test split")
        chance = (f"T0 targets (unseen: left out of the module library) are scored on their "
                  f"{scored}; always answering the most frequent train label scores "
                  f"{scores}.\n\n")
    kinds = " and ".join(k for k, on in (("BIG-Bench Hard", config.bbh.tasks),
                                         ("T0 targets", t0.tasks)) if on)
    header = (f"# LoRAHub ({config.preset}): {kinds}\n\n"
              f"Command: `{command}`\n\n"
              f"Model: `{config.model.path}`; {p.runs} runs of "
              f"{p.modules_per_run} modules; K={p.k} ADAPT examples; budget {p.budget} "
              f"evaluations (search {p.search}, population {p.population_size}); objective "
              f"{p.objective_mode}, L1 {p.l1_coeff}; greedy decoding of up to "
              f"{p.max_new_tokens} tokens. Exact match x 100 on each task's examples outside "
              f"the ADAPT set. {seconds:.0f} s.\n\n{chance}")
    run_state.write_atomic(out / "results.md", header + table + "\n")
    run_state.write_atomic(out / "results.json", results_json(
        results, command=command, seconds=seconds, config=dataclasses.asdict(config)) + "\n")
    if any(run.histories for r in results for run in r.runs):
        plot_search_progress(results, out / "search_progress.png",
                             title=f"preset {config.preset}: {p.runs} runs of "
                                   f"{p.modules_per_run} modules, K={p.k}")


def run_experiment(config: LoRAHubExperiment, argv: Sequence[str], stop: StopSignals) -> int:
    """Everything the module docstring says; returns the exit status (0 done, 128 + signal
    when stopped).

    Raises:
      SlimJaxError: bad input (unknown task, K too large, budget below one generation, modules
        that differ or are missing, an unusable `--out`), before the first task starts.
    """
    if config.compile_only:  # compile for --topology and report; no weights, no data
        from experiments.compile_only import lorahub_compile_only

        return lorahub_compile_only(config)
    start = time.perf_counter()
    out = run_folder(config)
    config = dataclasses.replace(config, out=str(out))
    tasks = load_tasks(config)
    # Before minutes of module training: a finished run, or another config's, is refused here.
    run_state.open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite,
                              create=False)
    command = shlex.join([*PROG.split(), *argv])
    if config.modules.local_only and config.modules.train_missing:  # before training them
        check_unseen(config, chosen_tasks(config.upstream, config.data_dir))
    overrides = model_overrides(config.model, config.data_dir)
    enable_compilation_cache(config.compilation_cache)
    saved = ensure_modules(config)
    if saved is not None:
        print(run_state.stop_message(PROG, stop.requested or "SIGTERM", saved, argv, out),
              file=sys.stderr, flush=True)
        return stop.exit_code
    pool, ids = module_pool(config)
    check_unseen(config, [task_of(i) for i in ids.values()] if not config.modules.local_only
                 else pool)
    draws = module_draws(pool, config.protocol.runs, config.protocol.modules_per_run)
    earlier = run_state.read_json(out / DRAWS) if not config.overwrite else None
    if earlier is not None and earlier != draws:
        raise ConfigError(f"--out {out}: the module draws differ from those of the interrupted "
                          "run there (the module folder changed); pass --overwrite or a new --out")
    model, tokenizer, _ = load_base(config.model.path, config.data_dir, dtype=config.model.dtype,
                                    param_dtype=config.model.param_dtype, **overrides)
    needed = list(dict.fromkeys(n for draw in draws for n in draw))
    modules = load_modules(config, model, needed, ids)
    check_modules(list(modules.values()))  # different ranks or layers: named, before any task
    run_state.open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite)
    run_state.write_atomic(out / "command.txt", command + "\n")
    run_state.write_json(out / DRAWS, draws)

    results: list[TaskResult] = []
    partial: dict[str, TaskResult] = {}
    for name in tasks:
        record = run_state.read_json(task_file(out, name))
        if record is not None:
            results.append(task_result(record))
        elif (record := run_state.read_json(task_file(out, name, partial=True))) is not None:
            partial[name] = task_result(record)
    if results or partial:
        inside = "".join(f"; {name} continues after run {len(r.runs)} of {len(draws)}"
                         for name, r in partial.items())
        print(f"{PROG}: resuming: {len(results)} of {len(tasks)} tasks finished in {out}"
              f"{inside}", flush=True)
    total = len(tasks) * steps_per_task(config.protocol)
    with tqdm(total=total, desc="lorahub bbh", disable=not config.progress) as bar:
        bar.update(len(results) * steps_per_task(config.protocol))
        for name, task in tasks.items():
            if any(r.task == name for r in results):
                continue

            def note(label: str, name: str = name) -> None:
                bar.set_postfix_str(f"{name[:24]} {label}")
                bar.update(1)

            def save(so_far: TaskResult, name: str = name) -> None:
                partial[name] = so_far
                run_state.write_json(task_file(out, name, partial=True),
                                     dataclasses.asdict(so_far))

            try:
                with stop.interruptible():
                    result = run_bbh_task(task, model, tokenizer, modules, draws,
                                          config.protocol, progress=note,
                                          done=partial.get(name), save=save)
            except Stopped:
                bar.close()
                saved = [f"{len(results)} of {len(tasks)} tasks finished ({out / 'results.md'})"]
                if name in partial:
                    saved.append(f"{name} at run {len(partial[name].runs)} of {len(draws)} "
                                 f"({task_file(out, name, partial=True)})")
                print(run_state.stop_message(PROG, stop.requested or "SIGTERM", saved, argv,
                                             out), file=sys.stderr, flush=True)
                return stop.exit_code
            run_state.write_json(task_file(out, name), dataclasses.asdict(result))
            task_file(out, name, partial=True).unlink(missing_ok=True)
            results.append(result)
            results.sort(key=lambda r: list(tasks).index(r.task))
            write_results(out, results, config, command, time.perf_counter() - start, tasks)
    write_results(out, results, config, command, time.perf_counter() - start, tasks)
    run_state.mark_finished(out)
    if config.progress:
        print(f"\n{results_table(results)}\n\nresults in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 when done, 2 on bad input (one line on stderr), 128 + the signal's
    number when a stop signal stopped it (one line says what is saved and how to resume); with
    `--compile-only true`, 0 when the programs fit `--topology` and 1 when they do not."""
    return run_command(PROG, argv, parse_cli, run_experiment,
                       flags={"allow_pickle=True": "--modules.allow-pickle"})


if __name__ == "__main__":
    sys.exit(main())
