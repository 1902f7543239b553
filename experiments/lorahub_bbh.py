"""`python -m experiments.lorahub_bbh`: LoRAHub on BIG-Bench Hard, with a vmapped CMA-ES search.

For every BBH task (LORAHUB.md s5): the K=5 ADAPT examples (seed 42, kept out of the test set),
zero-shot and in-context baselines, then five runs, run s composing the 20 modules drawn by
`random.seed(s); random.sample(names, 20)`: the uniform average, the best single module, and
each search (CMA-ES with the population vmapped, COBYLA as the reference runs it) at the same
budget; the found weights are merged once and the test set answered greedily (up to 256 new
tokens; a decoder-only model's prompt is cut from the left so prompt and answer fit its
positions). Scores are exact match x 100. The run folder:

    <out>/command.txt, config.json     the exact command, the full resolved config
    <out>/results.md                   the per-task table with the average over tasks
    <out>/results.json                 every run's modules, weights, objectives, histories
    <out>/search_progress.png          best objective against evaluations, CMA-ES vs COBYLA

The cpu preset (default) uses the TinyStories model with modules from
`python -m experiments.train_lora_modules` (trained first when the module folder is empty) and
draws over those modules in LoRAHub's list order; `--bbh.tasks all` runs all 27 tasks.

Examples:
    python -m experiments.lorahub_bbh                               # the cpu preset
    python -m experiments.lorahub_bbh --bbh.tasks navigate --protocol.runs 2
    python -m experiments.lorahub_bbh --protocol.methods cmaes,cobyla,gradient --protocol.budget 80
    python -m experiments.lorahub_bbh --preset flan-t5-large --modules.dir /ckpt/lorahub_modules
    python -m experiments.lorahub_bbh --help                        # every field and default
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flax import nnx
from tqdm.auto import tqdm

from experiments.config_cli import parse_preset_cli
from experiments.presets.lorahub import PRESETS, LoRAHubExperiment, UpstreamExperiment
from experiments.presets.lorahub import preset as get_preset
from experiments.run_folder import default_run_folder
from experiments.train_lora_modules import load_model, train_modules
from slim_jax.data import BBHTask, load_bbh
from slim_jax.errors import CheckpointError, SlimJaxError
from slim_jax.lorahub.library import LoRAModule, check_modules, find_module, load_module
from slim_jax.lorahub.protocol import TaskResult, module_draws, run_bbh_task, steps_per_task
from slim_jax.lorahub.report import plot_search_progress, results_json, results_table
from slim_jax.lorahub.upstream import read_module_ids, task_of
from slim_jax.settings import enable_compilation_cache

PROG = "python -m experiments.lorahub_bbh"


def parse_cli(argv: Sequence[str] | None = None) -> LoRAHubExperiment:
    """The config from the command line: `--preset` first, then field overrides."""
    return parse_preset_cli(PROG, __doc__, PRESETS, lambda name: get_preset(name)[0], argv)


def load_tasks(config: LoRAHubExperiment) -> dict[str, BBHTask]:
    """The BBH tasks, each checked to have more than K examples (before any other work).

    Raises:
      DataError: an unknown task name (listing the valid ones), missing files.
      ConfigError: K at least a task's number of examples.
    """
    names = None if tuple(config.bbh.tasks) == ("all",) else config.bbh.tasks
    tasks = load_bbh(names, config.data_dir, source=config.bbh.source)
    for task in tasks.values():
        task.adapt_split(config.protocol.k, config.protocol.adapt_seed)
    return tasks


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


def ensure_modules(config: LoRAHubExperiment) -> None:
    """Train the upstream modules first when the cpu-style module folder holds none."""
    if not config.modules.local_only or config.modules.dir is None:
        return
    if module_pool(config)[0]:
        return
    if not config.modules.train_missing:
        raise CheckpointError(
            f"the module folder {config.modules.dir} holds no LoRA module; train them with "
            f"`python -m experiments.train_lora_modules --out {config.modules.dir}` or pass "
            "--modules.train-missing true")
    upstream = UpstreamExperiment(
        preset=config.preset, out=config.modules.dir, data_dir=config.data_dir,
        progress=config.progress, compilation_cache=config.compilation_cache,
        model=config.model, upstream=config.upstream)
    train_modules(upstream)  # a fresh copy of the base model: the one used here stays plain


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
    if config.out is not None:
        return Path(config.out).expanduser()
    return default_run_folder("lorahub_bbh", config.preset)


def write_results(out: Path, results: list[TaskResult], config: LoRAHubExperiment,
                  command: str, seconds: float) -> None:
    """results.md, results.json and the search-progress plot (rewritten after every task)."""
    table = results_table(results)
    p = config.protocol
    header = (f"# LoRAHub on BIG-Bench Hard ({config.preset})\n\n"
              f"Command: `{command}`\n\n"
              f"Model: `{config.model.path}`; {p.runs} runs of "
              f"{p.modules_per_run} modules; K={p.k} ADAPT examples; budget {p.budget} "
              f"evaluations (CMA-ES population {p.population_size}); objective {p.objective_mode}"
              f", L1 {p.l1_coeff}; greedy decoding of up to {p.max_new_tokens} tokens. Exact "
              f"match x 100 on each task's examples outside the ADAPT set. {seconds:.0f} s.\n\n")
    (out / "results.md").write_text(header + table + "\n")
    (out / "results.json").write_text(results_json(results, command=command, seconds=seconds,
                                                   config=dataclasses.asdict(config)) + "\n")
    if any(run.histories for r in results for run in r.runs):
        plot_search_progress(results, out / "search_progress.png")


def run_experiment(config: LoRAHubExperiment, command: str) -> list[TaskResult]:
    """Everything the module docstring says; returns the per-task results.

    Raises:
      SlimJaxError: bad input (unknown task, K too large, budget below one generation, modules
        that differ or are missing), before the first task starts.
    """
    start = time.perf_counter()
    enable_compilation_cache(config.compilation_cache)
    tasks = load_tasks(config)
    ensure_modules(config)
    pool, ids = module_pool(config)
    draws = module_draws(pool, config.protocol.runs, config.protocol.modules_per_run)
    model, tokenizer, _ = load_model(config.model, config.data_dir)
    needed = list(dict.fromkeys(n for draw in draws for n in draw))
    modules = load_modules(config, model, needed, ids)
    check_modules(list(modules.values()))  # different ranks or layers: named, before any task

    out = run_folder(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command + "\n")
    (out / "config.json").write_text(json.dumps(
        {**dataclasses.asdict(config), "draws": draws}, indent=2, default=str) + "\n")
    total = len(tasks) * steps_per_task(config.protocol)
    results: list[TaskResult] = []
    with tqdm(total=total, desc="lorahub bbh", disable=not config.progress) as bar:
        for name, task in tasks.items():
            def note(label: str, name: str = name) -> None:
                bar.set_postfix_str(f"{name[:24]} {label}")
                bar.update(1)

            results.append(run_bbh_task(task, model, tokenizer, modules, draws,
                                        config.protocol, progress=note))
            write_results(out, results, config, command, time.perf_counter() - start)
    if config.progress:
        print(f"\n{results_table(results)}\n\nresults in {out}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input prints one line to stderr and returns 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_cli(args)
        if config.compile_only:  # compile for --topology and report; no weights, no data
            from experiments.compile_only import lorahub_compile_only

            return lorahub_compile_only(config)
        run_experiment(config, shlex.join([*PROG.split(), *args]))
    except SlimJaxError as err:
        print(f"{PROG.split()[-1]}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
