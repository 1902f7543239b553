"""Forgetting as the drop of a general-capability measure, and summaries over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

from slim_jax.errors import ConfigError


def forgetting(before: float, after: float, *, higher_is_better: bool = True) -> float:
    """How much a measure got worse from `before` to `after` fine-tuning (positive = forgot).

    For an accuracy (higher is better) it is `before - after`; for a loss such as a negative
    log-likelihood (lower is better) it is `after - before`.

    >>> forgetting(0.60, 0.45), forgetting(1.20, 1.50, higher_is_better=False)
    (0.15, 0.30000000000000004)
    """
    return before - after if higher_is_better else after - before


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0]), mean_std([5.0])
    ((2.0, 1.0), (5.0, 0.0))
    """
    if not values:
        raise ConfigError("mean_std needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
