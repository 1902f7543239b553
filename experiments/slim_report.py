"""Tables and plots of a SLIM experiment run folder: summaries over seeds, Markdown, figures.

Input is the per-run records the experiment writes (`runs/<method>/seed<k>/result.json`, gathered
in `results.json`): `downstream` (accuracy), `general` (measure -> value), `general_score` (the
headline measure), `forgetting` (its drop from the base model) and the base model's record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from slim_jax.eval import mean_std
from slim_jax.train import read_metrics

Record = Mapping[str, Any]


def summarize(runs: Sequence[Record], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method (in `methods` order), mean and std over seeds of every reported number.

    >>> rows = summarize([{"method": "a", "seed": 0, "downstream": 0.5, "general_score": 1.0,
    ...                    "forgetting": 0.1, "general": {"nll": 1.0}}], ["a"])
    >>> rows[0]["downstream"], rows[0]["seeds"]
    ((0.5, 0.0), [0])
    """
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method, "seeds": [r["seed"] for r in mine]}
        for key in ("downstream", "downstream_likelihood", "general_score", "forgetting",
                    "trainable_params", "train_seconds", "eval_seconds", "final_ce"):
            if all(r.get(key) is not None for r in mine):
                row[key] = mean_std([float(r[key]) for r in mine])
        row["general"] = {name: mean_std([float(r["general"][name]) for r in mine])
                          for name in mine[0]["general"]}
        rows.append(row)
    return rows


def curves_by_method(runs: Sequence[Record], methods: Sequence[str]
                     ) -> dict[str, list[dict[str, Any]]]:
    """Per method, its accuracy-forgetting curve over seeds: for each step every seed measured
    (`record["curve"]`, from `--eval.curve-every`), mean and std of downstream and forgetting.

    >>> runs = [{"method": "a", "seed": s, "curve": [{"step": 10, "downstream": d,
    ...          "forgetting": 0.1}]} for s, d in ((0, 0.5), (1, 0.7))]
    >>> point = curves_by_method(runs, ["a"])["a"][0]
    >>> point["step"], round(point["downstream"][0], 3), point["seeds"]
    (10, 0.6, 2)
    """
    curves: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        mine = [{int(p["step"]): p for p in r.get("curve") or ()}
                for r in runs if r["method"] == method]
        if not mine or not all(mine):
            continue
        steps = sorted(set.intersection(*(set(c) for c in mine)))
        curves[method] = [{"step": step, "seeds": len(mine),
                           "downstream": mean_std([c[step]["downstream"] for c in mine]),
                           "forgetting": mean_std([c[step]["forgetting"] for c in mine])}
                          for step in steps]
    return curves


Path2D = Sequence[tuple[float, float]]  # (forgetting, accuracy) points in step order


def accuracy_at_forgetting(path: Path2D, budget: float) -> float | None:
    """The best downstream accuracy a training path reaches while its forgetting stays within
    `budget`: the path is piecewise linear between its measured points (in step order), so a
    segment that crosses `budget` contributes its accuracy at the crossing. None when every
    point lies beyond the budget.

    >>> path = [(0.0, 0.0), (0.4, 0.5), (1.2, 0.7)]
    >>> accuracy_at_forgetting(path, 0.8), accuracy_at_forgetting(path, 2.0)
    (0.6, 0.7)
    >>> accuracy_at_forgetting([(0.5, 0.3)], 0.1) is None
    True
    """
    reached = [a for f, a in path if f <= budget]
    for (f0, a0), (f1, a1) in pairwise(path):
        if (f0 - budget) * (f1 - budget) < 0:  # the segment crosses the budget
            reached.append(a0 + (a1 - a0) * (budget - f0) / (f1 - f0))
    return max(reached) if reached else None


def forgetting_at_accuracy(path: Path2D, target: float) -> float | None:
    """The least forgetting at which a training path reaches downstream accuracy `target`
    (piecewise linear between its points, as `accuracy_at_forgetting`); None when it never
    does.

    >>> path = [(0.0, 0.0), (0.4, 0.5), (1.2, 0.7)]
    >>> forgetting_at_accuracy(path, 0.6), forgetting_at_accuracy(path, 0.9)
    (0.8, None)
    """
    reached = [f for f, a in path if a >= target]
    for (f0, a0), (f1, a1) in pairwise(path):
        if (a0 - target) * (a1 - target) < 0:
            reached.append(f0 + (f1 - f0) * (target - a0) / (a1 - a0))
    return min(reached) if reached else None


def mean_accuracy_within(path: Path2D, limit: float, samples: int = 1001) -> float:
    """The area under a path's accuracy-at-forgetting frontier over forgetting [0, `limit`],
    divided by `limit`: the mean best accuracy across forgetting budgets (trapezoid rule on
    `samples` budgets; a budget no point fits counts as 0 accuracy).

    >>> round(mean_accuracy_within([(0.0, 0.0), (1.0, 1.0)], 1.0), 3)
    0.5
    """
    if limit <= 0:
        raise ValueError(f"the forgetting range must be positive, got {limit}")
    values = [accuracy_at_forgetting(path, limit * i / (samples - 1)) or 0.0
              for i in range(samples)]
    return (sum(values) - (values[0] + values[-1]) / 2) / (samples - 1)


def curve_comparison(runs: Sequence[Record], methods: Sequence[str],
                     base: Record) -> dict[str, Any] | None:
    """Methods compared along their accuracy-forgetting curves (`--eval.curve-every`), not at
    one point: every seed's path starts at the base model (step 0: the adapters start as a zero
    change) and joins its curve points; budgets and targets are common to all methods.

    - `forgetting_range` F: the least of the methods' largest mean forgetting along training,
      so every method is measured over forgetting it actually reached;
    - per method, mean ± std over seeds of: the mean accuracy over forgetting budgets [0, F]
      (area under the frontier / F), the accuracy at forgetting <= F/2 and <= F, and the
      forgetting at which accuracy reaches A/2 and A, A being the least of the methods' best
      mean accuracies (a seed that never reaches a target is counted in `reached`, not in the
      mean).
    None when some method has no curve.
    """
    curves = curves_by_method(runs, methods)
    if not curves or len(curves) < len({r["method"] for r in runs}):
        return None
    origin = (0.0, float(base["downstream"]))
    limit = min(max(p["forgetting"][0] for p in points) for points in curves.values())
    target = min(max(p["downstream"][0] for p in points) for points in curves.values())
    if limit <= 0:
        return None
    rows = []
    for method, points in curves.items():
        steps = {p["step"] for p in points}
        paths = [[origin, *((float(p["forgetting"]), float(p["downstream"]))
                            for p in r["curve"] if int(p["step"]) in steps)]
                 for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": len(paths),
                               "mean_accuracy": mean_std([mean_accuracy_within(p, limit)
                                                          for p in paths])}
        for name, budget in (("accuracy_at_half_range", limit / 2), ("accuracy_at_range", limit)):
            row[name] = mean_std([accuracy_at_forgetting(p, budget) or 0.0 for p in paths])
        for name, goal in (("forgetting_at_half_target", target / 2),
                           ("forgetting_at_target", target)):
            found = [f for f in (forgetting_at_accuracy(p, goal) for p in paths) if f is not None]
            row[name] = {"reached": len(found), "value": mean_std(found) if found else None}
        rows.append(row)
    return {"forgetting_range": limit, "accuracy_target": target, "rows": rows}


def markdown_curve_table(comparison: Record) -> str:
    """`curve_comparison` as a Markdown table (accuracies in %, forgetting in the headline
    measure's units; mean ± std over seeds)."""
    limit, target = comparison["forgetting_range"], comparison["accuracy_target"]
    head = ["method", f"mean acc over forgetting [0, {limit:.3f}] (%)",
            f"acc at forgetting <= {limit / 2:.3f} (%)", f"acc at forgetting <= {limit:.3f} (%)",
            f"forgetting at acc {100 * target / 2:.1f}%", f"forgetting at acc {100 * target:.1f}%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in comparison["rows"]:
        cells = [f"`{row['method']}`", _cell(row["mean_accuracy"], percent=True),
                 _cell(row["accuracy_at_half_range"], percent=True),
                 _cell(row["accuracy_at_range"], percent=True)]
        for name in ("forgetting_at_half_target", "forgetting_at_target"):
            found = row[name]
            cell = _cell(found["value"], 3) if found["value"] is not None else "not reached"
            if found["reached"] < row["seeds"]:
                cell += f" ({found['reached']} of {row['seeds']} seeds)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: tuple[float, float], digits: int = 3, percent: bool = False) -> str:
    mean, std = value
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: Sequence[Record], base: Record, *, headline: str,
                   higher_is_better: bool) -> str:
    """The results table: one row per method (mean ± std over seeds) and the base model.

    Columns: downstream accuracy (%; and by likelihood over the choices when measured), the
    headline general measure, forgetting (its drop from the base; positive = worse), the other
    general measures, trainable parameters.
    """
    extra = [name for name in base["general"] if name != headline]
    ranked = base.get("downstream_likelihood") is not None
    direction = "higher is better" if higher_is_better else "lower is better"
    head = ["method", "seeds", "downstream acc (%)",
            *(["downstream acc by likelihood (%)"] if ranked else []),
            f"general: {headline} ({direction})", f"forgetting (drop of {headline})", *extra,
            "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_cells = ["base model", "-", f"{100 * base['downstream']:.1f}",
                  *([f"{100 * base['downstream_likelihood']:.1f}"] if ranked else []),
                  f"{base['general'][headline]:.4f}", "0",
                  *(f"{base['general'][n]:.4f}" for n in extra), "0"]
    lines.append("| " + " | ".join(base_cells) + " |")
    for row in summary:
        cells = [f"`{row['method']}`", str(len(row["seeds"])),
                 _cell(row["downstream"], percent=True)]
        if ranked:
            cells.append(_cell(row["downstream_likelihood"], percent=True)
                         if "downstream_likelihood" in row else "-")
        cells += [_cell(row["general_score"], 4), _cell(row["forgetting"], 4)]
        cells += [_cell(row["general"][n], 4) for n in extra]
        cells.append(f"{row['trainable_params'][0]:,.0f}" if "trainable_params" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Distinct line styles and markers, so that no method hides under another (e.g. `slim` under an
# ablation that learns the same curve).
STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P"))


def plot_losses(run_dirs: Mapping[str, Sequence[str | os.PathLike[str]]],
                out: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Training loss against step, one line per method (mean over seeds, band = min..max).

    Args:
      run_dirs: method -> its runs' folders (each with the trainer's `metrics.jsonl`).
      out: the PNG to write.
      title: what the run was (task, preset, seeds); shown above the plot.
    """
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method, dirs in run_dirs.items():
        curves = []
        for d in dirs:
            path = Path(d) / "metrics.jsonl"
            if path.is_file():
                records = [r for r in read_metrics(path) if "loss" in r]
                curves.append({int(r["step"]): float(r["loss"]) for r in records})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        style, marker = STYLES[len(ax.get_lines()) % len(STYLES)]
        label = (method if len(curves) == 1
                 else f"{method} (mean; band: min-max of {len(curves)} seeds)")
        line, = ax.plot(steps, values.mean(0), ls=style, marker=marker,
                        markevery=max(1, len(steps) // 8), ms=4, label=label)
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(),
                            alpha=0.15)
    ax.set_title(title or "training loss per method", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def plot_tradeoff(summary: Sequence[Record], base: Record, out: str | os.PathLike[str], *,
                  headline: str, title: str | None = None,
                  curves: Mapping[str, Sequence[Record]] | None = None) -> Path:
    """Downstream accuracy against forgetting, one point per method (error bars: std over
    seeds); the base model sits at zero forgetting. With `curves` (`curves_by_method`), each
    method's points along training are joined by a line in its style, labelled with their
    steps, bands of std over seeds. Up and to the left is better; `title` says what the run was
    (task, preset, seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    ax.scatter([0.0], [100 * base["downstream"]], marker="x", color="black", label="base model")
    curves = curves or {}
    for i, row in enumerate(summary):
        (f_mean, f_std), (d_mean, d_std) = row["forgetting"], row["downstream"]
        style, marker = STYLES[i % len(STYLES)]
        bars = ax.errorbar([f_mean], [100 * d_mean], xerr=[f_std], yerr=[100 * d_std],
                           fmt=marker, capsize=3, ms=7,
                           label=f"{row['method']}: final (mean ± std over seeds)")
        points = curves.get(row["method"])
        if points:
            xs = [p["forgetting"][0] for p in points]
            ys = [100 * p["downstream"][0] for p in points]
            color = bars.lines[0].get_color()
            ax.errorbar(xs, ys, xerr=[p["forgetting"][1] for p in points],
                        yerr=[100 * p["downstream"][1] for p in points], ls=style, marker=marker,
                        ms=3, lw=1, capsize=2, color=color, alpha=0.7,
                        label=f"{row['method']}: along training (steps "
                              f"{points[0]['step']}..{points[-1]['step']}, subset)")
            ax.annotate(str(points[-1]["step"]), (xs[-1], ys[-1]), fontsize=6, color=color)
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_title(f"{title + chr(10) if title else ''}up and to the left is better", fontsize=10)
    ax.set_xlabel(f"forgetting (drop of {headline} from the base model; lower is better)")
    ax.set_ylabel("downstream accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
