"""The loss plot: readable (title, labelled axes, lower is better) and each step drawn once."""

from __future__ import annotations

import json

from slim_jax.train import plot


def test_loss_plot_is_labelled_and_draws_each_step_once(tmp_path, monkeypatch):
    run = tmp_path / "slim-seed0"
    run.mkdir()
    records = [{"step": s, "loss": 3 - s / 10, "ce": 2.9 - s / 10, "l1": 0.1} for s in (1, 2, 3)]
    records.append({"step": 2, "loss": 9.0, "ce": 9.0, "l1": 0.1})  # a step written twice
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = []
    draw = plot.loss_figure
    monkeypatch.setattr(plot, "loss_figure", lambda *a: figures.append(draw(*a)) or figures[-1])
    path = plot.plot_loss(run / "metrics.jsonl")
    assert path == run / "loss.png" and path.read_bytes()[:4] == b"\x89PNG"

    ax = figures[0].axes[0]
    assert ax.get_title() == "training loss: slim-seed0"
    assert ax.get_xlabel() == "step (optimiser updates)"
    assert "nats" in ax.get_ylabel()
    assert "lower is better" in [t.get_text() for t in ax.texts]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss (cross-entropy + L1 penalty)", "cross-entropy"]
    assert ax.lines[0].get_xdata().tolist() == [1, 2, 3]  # step 2 once: its last record
    assert ax.lines[0].get_ydata().tolist()[1] == 9.0
