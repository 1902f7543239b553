"""`python -m experiments.lorahub_search_study`: which search to make LoRAHub's default.

On the ADAPT objectives of real targets (never test accuracy): for every target (the BBH tasks
and the unseen T0 templates of the cpu preset, as `python -m experiments.lorahub_bbh` runs them)
and every module draw, each search configuration runs at a budget of 200 evaluations on the same
objective; its best-so-far objective is read at 40, 100 and 200 evaluations, and against
execution seconds (compilation excluded: with JAX's persistent cache a program compiles once per
machine). Writes to `--out`:

    study.json            every configuration's values and times per (task, draw)
    study.md              the table: mean improvement over w = 0 at 40 / 100 / 200 evaluations
                          and its range over (task, draw), the mean rank at 40, seconds for 40,
                          and the same at equal wall time (the seconds COBYLA takes for 40 and
                          for 200 evaluations)
    study_evals.png       best-so-far (relative to w = 0) against evaluations, mean over targets
    study_seconds.png     the same against execution seconds

Modules come from a folder of PEFT adapters (`python -m experiments.train_lora_modules`); each
draw takes `--per-run` of them with the reference's `random.seed(s); random.sample`.

Example:
    python -m experiments.lorahub_search_study --modules runs/lorahub_modules/tinystories260k \\
        --runs 2 --out experiments/results/lorahub_search_study
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.base_model import load_base
from experiments.lorahub_bbh import module_pool
from experiments.presets.lorahub import (
    CPU_T0_TARGETS,
    CPU_TASKS,
    LoRAHubExperiment,
    ModelSpec,
    ModulesSpec,
)
from experiments.run_state import read_json, write_atomic
from slim_jax.data import load_bbh, load_t0_target
from slim_jax.errors import ConfigError, SlimJaxError
from slim_jax.lorahub import (
    ModuleLibrary,
    build_objective,
    load_module,
    module_draws,
    objective_layout,
    search,
)
from slim_jax.settings import enable_compilation_cache

BUDGET = 200
MARKS = (40, 100, 200)
# (label, search, settings): the grid of CMA-ES populations and steps, the other
# strategies at their tested settings, the starts and restarts, and the reference.
CONFIGS: tuple[tuple[str, str, dict], ...] = (
    *((f"cmaes P{p} s{s}", "cmaes", {"population_size": p, "sigma": s})
      for p in (4, 8, 16, 32) for s in (0.3, 0.5, 1.0)),
    ("sep_cmaes P8 s0.5", "sep_cmaes", {"population_size": 8, "sigma": 0.5}),
    ("snes P4 s0.3", "snes", {"population_size": 4, "sigma": 0.3}),
    ("snes P8 s0.5", "snes", {"population_size": 8, "sigma": 0.5}),
    ("singles+cmaes P8 s0.5 top1", "singles_cmaes", {"population_size": 8, "sigma": 0.5}),
    ("singles+cmaes P8 s0.3 top1", "singles_cmaes", {"population_size": 8, "sigma": 0.3}),
    ("singles+cmaes P8 s0.5 top3", "singles_cmaes",
     {"population_size": 8, "sigma": 0.5, "top": 3}),
    ("ipop_cmaes P4 s0.5", "ipop_cmaes", {"population_size": 4, "sigma": 0.5}),
    ("cobyla (reference)", "cobyla", {}),
    ("gradient lr0.05", "gradient", {"learning_rate": 0.05}),
)


def run_study(modules_dir: str, tasks: Sequence[str], t0_tasks: Sequence[str], runs: int,
              per_run: int, data_dir: str | None, out_dir: Path) -> dict:
    """Every configuration on every (target, draw): values and times per evaluation (study.json
    rewritten after each target, so a long study can be read part way). Targets are the BBH
    `tasks`, then the T0 templates `t0_tasks` (ADAPT examples from their train part, as
    `lorahub_bbh` draws them); a T0 target that is one of the modules is refused."""
    spec = ModelSpec()
    model, tokenizer, _ = load_base(spec.path, data_dir, dtype=spec.dtype,
                                    param_dtype=spec.param_dtype)
    root = Path(modules_dir)
    # The pool and its order as lorahub_bbh draws from it (LoRAHub's list order), so each draw
    # here is the same 20 modules as run s of the default command.
    config = LoRAHubExperiment(data_dir=data_dir, modules=ModulesSpec(dir=modules_dir))
    names, _ = module_pool(config)
    if not names:
        raise ConfigError(f"--modules {root}: no PEFT module folder of LoRAHub's list there")
    modules = {n: load_module(root / n, model, name=n) for n in names}
    draws = module_draws(names, runs, per_run)
    layout = objective_layout(model, tokenizer)
    seen = sorted(set(t0_tasks) & set(names))
    if seen:
        raise ConfigError(f"--t0-tasks: {seen[0]!r} is one of the modules in {root}; a target "
                         "must be unseen (drop it from --t0-tasks)")
    targets = {**load_bbh(list(tasks), data_dir),
               **{n: load_t0_target(n, data_dir) for n in t0_tasks}}
    out: dict = {"modules": names, "draws": draws, "targets": []}
    done = _finished_targets(out_dir / "study.json", names, draws)
    # Draws outside, targets inside: a study cut short still covers every target.
    adapts = {name: task.as_examples(task.adapt_split()[0]) for name, task in targets.items()}
    for run, draw in enumerate(draws, start=1):
        attached = ModuleLibrary.from_modules([modules[n] for n in draw]).attach(model)
        for name, adapt in adapts.items():
            if (name, run) in done:  # a restarted study keeps what it finished
                out["targets"].append(done[name, run])
                continue
            objective = build_objective(attached, adapt, layout)
            target = {"task": name, "run": run, "results": {},
                      "load_before": os.getloadavg()[0]}
            for label, method, settings in CONFIGS:
                seeded = {} if method in ("cobyla", "gradient") else {"seed": run}
                r = search(objective, method, budget=BUDGET, **settings, **seeded)
                target["results"][label] = {
                    "values": r.values.tolist(), "times": r.times.tolist(),
                    "compile_seconds": r.compile_seconds}
                print(f"{name} run {run} {label}: {r.objective:.4f} "
                      f"(w=0: {r.values[0]:.4f})", flush=True)
            target["load_after"] = os.getloadavg()[0]
            out["targets"].append(target)
            write_atomic(out_dir / "study.json", json.dumps(out) + "\n")
    return out


def _finished_targets(path: Path, modules: list[str],
                      draws: list[list[str]]) -> dict[tuple[str, int], dict]:
    """The (target, run) results of an earlier start of the same study (same modules and draws)
    with every configuration finished; nothing when there is none or it differs."""
    old = read_json(path)
    if old is None:
        return {}
    if old.get("modules") != modules or old.get("draws") != draws:
        raise ConfigError(f"{path} holds a study of other modules or draws; give another --out")
    labels = {c[0] for c in CONFIGS}
    return {(t["task"], t["run"]): t for t in old["targets"] if set(t["results"]) == labels}


def _relative(values: Sequence[float], start: float) -> np.ndarray:
    """Best-so-far objective as a fraction of the objective at w = 0 (1 = no progress)."""
    return np.minimum.accumulate(np.asarray(values)) / start


def _at_seconds(values: Sequence[float], times: Sequence[float], start: float,
                seconds: float) -> float:
    """Best-so-far (relative to w = 0) among the evaluations finished within `seconds`."""
    done = np.asarray(times) <= seconds
    return float(np.min(np.asarray(values)[done]) / start) if done.any() else 1.0


def summarize(study: dict) -> str:
    """The Markdown table of the module docstring."""
    labels = [c[0] for c in CONFIGS]
    ref = "cobyla (reference)"
    starts = [t["results"][ref]["values"][0] for t in study["targets"]]
    at = {m: np.array([[_relative(t["results"][lab]["values"], s)[
        min(m, len(t["results"][lab]["values"])) - 1] for lab in labels]
        for t, s in zip(study["targets"], starts, strict=True)]) for m in MARKS}
    ranks = np.argsort(np.argsort(at[40], axis=1), axis=1).mean(0) + 1
    secs = [np.mean([t["results"][lab]["times"][min(40, len(t["results"][lab]["times"])) - 1]
                     for t in study["targets"]]) for lab in labels]
    # Equal wall time: per target, the seconds the reference takes for 40 and for 200
    # evaluations; every configuration is read at that time on the same target.
    walls = {m: [t["results"][ref]["times"][min(m, len(t["results"][ref]["times"])) - 1]
                 for t in study["targets"]] for m in (40, 200)}
    at_wall = {m: np.array([[_at_seconds(t["results"][lab]["values"], t["results"][lab]["times"],
                                         s, w) for lab in labels]
                            for t, s, w in zip(study["targets"], starts, walls[m], strict=True)])
               for m in (40, 200)}
    def spread(x: np.ndarray) -> str:  # over the (target, draw) objectives
        return f"{x.mean():.3f} ({x.min():.3f}-{x.max():.3f})"

    lines = ["| search | @40: mean (min-max) | @100 | @200 | mean rank @40 | s for 40 evals "
             "| @COBYLA's s for 40 | @COBYLA's s for 200 |",
             "|---|---|---|---|---|---|---|---|"]
    for j, lab in enumerate(labels):
        cells = [spread(at[40][:, j]), spread(at[100][:, j]), spread(at[200][:, j]),
                 f"{ranks[j]:.1f}", f"{secs[j]:.2f}",
                 spread(at_wall[40][:, j]), spread(at_wall[200][:, j])]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(study: dict, out: Path) -> None:
    """Best-so-far relative to w = 0 against evaluations and against execution seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [t["results"]["cobyla (reference)"]["values"][0] for t in study["targets"]]
    shown = [c[0] for c in CONFIGS if c[0] in (
        "cmaes P8 s0.5", "cmaes P4 s0.3", "sep_cmaes P8 s0.5", "snes P4 s0.3",
        "cmaes P32 s0.5", "singles+cmaes P8 s0.5 top1", "ipop_cmaes P4 s0.5",
        "cobyla (reference)",
        "gradient lr0.05")]
    for axis, name in (("evaluations", "study_evals.png"), ("seconds", "study_seconds.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        for lab in shown:
            curves = [_relative(t["results"][lab]["values"], s)
                      for t, s in zip(study["targets"], starts, strict=True)]
            if axis == "evaluations":
                x = np.arange(1, BUDGET + 1)
                y = np.mean([np.pad(c, (0, BUDGET - len(c)), mode="edge") for c in curves], 0)
            else:
                grid = np.linspace(0, max(max(t["results"][lab]["times"])
                                          for t in study["targets"]), 100)
                y = np.mean([np.interp(grid, t["results"][lab]["times"], c, left=1.0)
                             for t, c in zip(study["targets"], curves, strict=True)], 0)
                x = grid
            ax.plot(x, y, label=lab)
        if axis == "evaluations":
            for m in MARKS:
                ax.axvline(m, color="gray", lw=0.5)
        ax.set_xlabel("evaluations" if axis == "evaluations"
                      else "execution seconds (compilation excluded)")
        ax.set_ylabel("best objective / objective at w = 0")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.lorahub_search_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", required=True, help="folder of PEFT module folders")
    parser.add_argument("--tasks", default=",".join(CPU_TASKS),
                        help="BBH tasks, comma-separated (empty: none)")
    parser.add_argument("--t0-tasks", default=",".join(CPU_T0_TARGETS),
                        help="unseen T0 templates as targets, comma-separated (empty: none)")
    parser.add_argument("--runs", type=int, default=2, help="module draws per task")
    parser.add_argument("--per-run", type=int, default=20,
                        help="modules per draw (the protocol's N: 20)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="experiments/results/lorahub_search_study")
    parser.add_argument("--compilation-cache", default="~/.cache/slim_jax/xla",
                        help="JAX's persistent compilation cache folder; none turns it off")
    args = parser.parse_args(argv)
    enable_compilation_cache(None if args.compilation_cache.lower() == "none"
                             else args.compilation_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, t0_tasks = ([n for n in a.split(",") if n] for a in (args.tasks, args.t0_tasks))
    if not tasks and not t0_tasks:
        parser.error("no target: give --tasks or --t0-tasks")
    try:
        study = run_study(args.modules, tasks, t0_tasks, args.runs, args.per_run, args.data_dir,
                          out)
    except SlimJaxError as e:  # bad input: one line, exit 2
        parser.error(str(e))
    table = summarize(study)
    (out / "study.md").write_text(table + "\n")
    plot(study, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
