"""The comparison of methods along their accuracy-forgetting curves (experiments/slim_report.py)."""

import pytest

from experiments.slim_report import curve_comparison, markdown_curve_table

BASE = {"downstream": 0.0}


def _runs(method: str, curves: list[list[tuple[int, float, float]]]) -> list[dict]:
    return [{"method": method, "seed": seed,
             "curve": [{"step": s, "forgetting": f, "downstream": a} for s, f, a in points]}
            for seed, points in enumerate(curves)]


def test_a_method_that_dominates_wins_every_column():
    """`good` reaches each accuracy with half the forgetting of `bad`: more accuracy at every
    budget, less forgetting at every target, and the shared range is the smaller one."""
    good = _runs("good", [[(10, 0.2, 0.5), (20, 0.5, 0.8)], [(10, 0.2, 0.4), (20, 0.5, 0.8)]])
    bad = _runs("bad", [[(10, 0.4, 0.5), (20, 1.0, 0.8)], [(10, 0.4, 0.4), (20, 1.0, 0.8)]])
    along = curve_comparison(good + bad, ["good", "bad"], BASE)
    assert along["forgetting_range"] == pytest.approx(0.5)
    assert along["accuracy_target"] == pytest.approx(0.8)
    rows = {row["method"]: row for row in along["rows"]}
    g, b = rows["good"], rows["bad"]
    for key in ("mean_accuracy", "accuracy_at_half_range", "accuracy_at_range"):
        assert g[key][0] > b[key][0]
    # Seed 0 of `bad` at budget 0.25: on the segment (0, 0) -> (0.4, 0.5), accuracy 0.3125.
    assert b["accuracy_at_half_range"][0] == pytest.approx((0.3125 + 0.25) / 2)
    assert g["accuracy_at_range"] == pytest.approx((0.8, 0.0))
    for key in ("forgetting_at_half_target", "forgetting_at_target"):
        assert g[key]["reached"] == b[key]["reached"] == 2
        assert g[key]["value"][0] == pytest.approx(b[key]["value"][0] / 2)
    table = markdown_curve_table(along)
    assert table.count("\n") == 4 and "| `good` | " in table and "not reached" not in table


def test_targets_a_seed_misses_are_counted_not_averaged():
    runs = _runs("a", [[(10, 0.5, 0.9)], [(10, 0.5, 0.3)]]) + _runs("b", [[(10, 0.6, 0.6)]])
    along = curve_comparison(runs, ["a", "b"], BASE)
    row = next(r for r in along["rows"] if r["method"] == "a")
    assert along["accuracy_target"] == pytest.approx(0.6)
    assert row["forgetting_at_target"]["reached"] == 1
    assert row["forgetting_at_target"]["value"][0] == pytest.approx(0.5 * 0.6 / 0.9)
    assert "(1 of 2 seeds)" in markdown_curve_table(along)


def test_no_comparison_without_every_methods_curve():
    runs = [*_runs("a", [[(10, 0.5, 0.9)]]), {"method": "b", "seed": 0, "curve": []}]
    assert curve_comparison(runs, ["a", "b"], BASE) is None
