"""The loss plot of a run, drawn from its metrics file (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import os

from etils import epath

from slim_jax.train.metrics import read_metrics


def plot_loss(
    metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None
) -> epath.Path:
    """Draw loss (and cross-entropy, when an L1 term makes them differ) against step to a PNG.

    Args:
      metrics_path: a `metrics.jsonl` written by the trainer (records with `step` and `loss`);
        local or on object storage (`gs://...`), as the image.
      out_path: the image; default `loss.png` next to the metrics file.

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r and "step" in r]
    out = epath.Path(out_path if out_path is not None else metrics_path)
    if out_path is None:
        out = out.with_name("loss.png")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = [r["step"] for r in records]
    marker = "." if len(records) < 50 else None  # few points: show where they are
    ax.plot(steps, [r["loss"] for r in records], label="loss", marker=marker)
    if any(r.get("l1", 0) for r in records):
        ax.plot(steps, [r.get("ce", r["loss"]) for r in records], label="cross-entropy",
                marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with out.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out
