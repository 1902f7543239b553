"""The results of a LoRAHub BBH run as a Markdown table, JSON, and a search-progress plot.

Table: one row per task, then the average over tasks. Columns: zero-shot, in-context learning,
the uniform average and the best single module (mean over runs), and for every search method
the mean and the best of the runs (the paper reports both for LoRAHub).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slim_jax.lorahub.protocol import BASELINES, RUN_BASELINES, TaskResult

_TITLES = {"zero_shot": "zero-shot", "icl": "ICL", "uniform": "uniform", "best_single":
           "best single", "cmaes": "LoRAHub CMA-ES", "sep_cmaes": "LoRAHub sep-CMA-ES",
           "snes": "LoRAHub SNES", "singles_cmaes": "LoRAHub singles+CMA-ES",
           "ipop_cmaes": "LoRAHub IPOP-CMA-ES", "cobyla": "LoRAHub COBYLA",
           "gradient": "LoRAHub gradient"}


def table_columns(results: Sequence[TaskResult]) -> list[tuple[str, str, str]]:
    """`(title, method, statistic)` per column, statistic "value", "mean" or "best"."""
    columns = []
    present = {m for r in results for m in r.baselines}
    per_run = [m for r in results for run in r.runs for m in run.scores]
    columns += [(_TITLES[b], b, "value") for b in BASELINES if b in present]
    columns += [(_TITLES[b] + " (mean)", b, "mean") for b in RUN_BASELINES if b in per_run]
    searches = list(dict.fromkeys(m for m in per_run if m not in RUN_BASELINES))
    for method in searches:
        title = _TITLES.get(method, method)
        columns += [(f"{title} (mean)", method, "mean"), (f"{title} (best)", method, "best")]
    return columns


def _cell(result: TaskResult, method: str, statistic: str) -> float | None:
    if statistic == "value":
        return result.baselines.get(method)
    scores = result.method_scores(method)
    if not scores:
        return None
    return float(np.mean(scores) if statistic == "mean" else np.max(scores))


def results_table(results: Sequence[TaskResult]) -> str:
    """The Markdown table of exact match x 100 per task and the average over tasks.

    >>> from slim_jax.lorahub.protocol import RunResult
    >>> runs = [RunResult(s, ["a"], scores={"cmaes": v}) for s, v in ((1, 50.0), (2, 60.0))]
    >>> r = TaskResult("navigate", 5, 245, {"zero_shot": 40.0}, runs)
    >>> print(results_table([r]))
    | task | n test | zero-shot | LoRAHub CMA-ES (mean) | LoRAHub CMA-ES (best) |
    |---|---|---|---|---|
    | navigate | 245 | 40.0 | 55.0 | 60.0 |
    | **average** | 245 | 40.0 | 55.0 | 60.0 |
    """
    columns = table_columns(results)
    lines = ["| task | n test | " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    grid = [[_cell(r, m, s) for _, m, s in columns] for r in results]
    for result, row in zip(results, grid, strict=True):
        lines.append(f"| {result.task} | {result.num_test} | " + " | ".join(map(_fmt, row))
                     + " |")
    means = [_mean([row[j] for row in grid]) for j in range(len(columns))]
    total = sum(r.num_test for r in results)
    lines.append(f"| **average** | {total} | " + " | ".join(map(_fmt, means)) + " |")
    return "\n".join(lines)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_json(results: Sequence[TaskResult], **extra: Any) -> str:
    """Every task's scores, objectives, weights and histories as JSON (plus `extra` fields)."""
    averages = {f"{m}/{s}": _mean([_cell(r, m, s) for r in results])
                for _, m, s in table_columns(results)}
    payload = {**extra, "average": averages, "tasks": [dataclasses.asdict(r) for r in results]}
    return json.dumps(payload, indent=2)


def plot_search_progress(results: Sequence[TaskResult], path: str | os.PathLike[str], *,
                         title: str | None = None) -> Path:
    """Best objective so far against evaluations, per task, for every search method: the mean
    over runs as a line, the range over runs shaded (equal budgets share the x axis); `title`
    (e.g. the preset and the number of runs) goes above the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for r in results for run in r.runs for m in run.histories))
    cols = min(3, max(1, len(results)))
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100,
                             squeeze=False)
    for ax, result in zip(axes.flat, results, strict=False):
        for method in methods:
            curves = [run.histories[method] for run in result.runs if method in run.histories]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            stack = np.array([c[:length] for c in curves])
            x = np.arange(1, length + 1)
            style = ("-", "--", "-.", ":")[methods.index(method) % 4]
            line, = ax.plot(x, stack.mean(0), ls=style,
                            label=f"{_TITLES.get(method, method)} (mean; band: min-max of "
                                  f"{len(curves)} runs)")
            ax.fill_between(x, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(result.task, fontsize=9)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("best objective (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
