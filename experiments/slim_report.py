"""Tables and plots of a SLIM experiment run folder: summaries over seeds, Markdown, figures.

Input is the per-run records the experiment writes (`runs/<method>/seed<k>/result.json`, gathered
in `results.json`): `downstream` (accuracy), `general` (measure -> value), `general_score` (the
headline measure), `forgetting` (its drop from the base model) and the base model's record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
