"""The loss plot of a run, drawn from its metrics file (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from slim_jax.train.metrics import read_metrics


def plot_loss(
    metrics_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> epath.Path:
    """Draw loss (and cross-entropy, when an L1 term makes them differ) against step to a PNG.

    The plot has a title (default: the run folder's name), labelled axes and says that lower is
    better. Each step is drawn once: when a step appears twice in the file (a run killed and
    resumed by an older version), its last record counts.

    Args:
      metrics_path: a `metrics.jsonl` written by the trainer (records with `step` and `loss`);
        local or on object storage (`gs://...`), as the image.
      out_path: the image; default `loss.png` next to the metrics file.
      title: the plot's title; default "training loss: <folder of the metrics file>".

    Returns:
      The image path.

    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "metrics.jsonl")
    ...     with open(path, "w") as f:
    ...         _ = f.write("\\n".join(json.dumps({"step": s, "loss": 1 / s}) for s in (1, 2, 3)))
    ...     plot_loss(path).name
    'loss.png'
    """
    by_step = {r["step"]: r for r in read_metrics(metrics_path) if "loss" in r and "step" in r}
    out = epath.Path(out_path if out_path is not None else metrics_path)
    if out_path is None:
        out = out.with_name("loss.png")
    name = epath.Path(metrics_path).parent.name or str(metrics_path)
    fig = loss_figure([by_step[s] for s in sorted(by_step)],
                      title if title is not None else f"training loss: {name}")
    with out.open("wb") as f:
        fig.savefig(f, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def loss_figure(records: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The figure of `plot_loss` for metrics records (`step`, `loss`, optional `l1`, `ce`).

    >>> fig = loss_figure([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], "run a")
    >>> ax = fig.axes[0]
    >>> ax.get_title(), ax.get_xlabel(), ax.lines[0].get_xdata().tolist()
    ('run a', 'step (optimiser updates)', [1, 2])
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = [r["step"] for r in records]
    marker = "." if len(records) < 50 else None  # few points: show where they are
    with_l1 = any(r.get("l1", 0) for r in records)
    ax.plot(steps, [r["loss"] for r in records], marker=marker,
            label="loss (cross-entropy + L1 penalty)" if with_l1 else "loss (cross-entropy)")
    if with_l1:
        ax.plot(steps, [r.get("ce", r["loss"]) for r in records], label="cross-entropy",
                marker=marker, linestyle="--")
    ax.set_xlabel("step (optimiser updates)")
    ax.set_ylabel("loss per target token (nats)")
    ax.set_title(title, fontsize=10)
    ax.text(0.99, 0.98, "lower is better", transform=ax.transAxes, ha="right", va="top",
            fontsize=8, color="0.4")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig
