"""Evaluation along training: measure the model of every k-th step, so a run gives a curve.

`Trainer.fit(batches, evaluate=Periodic(fn, every=25))` calls `fn(model, step)` on the trained
model of steps 25, 50, ... and of the last step, and writes each result as one JSON line
(`{"step": ..., **fn's values}`) into `<run_dir>/evals.jsonl`. The model handed to `fn` is the
one a checkpoint of that step restores (`Trainer.model()`: adapters and mutable state of that
step), so a point of the curve equals evaluating that step's checkpoint on its own. A resumed
run drops the records of steps after its checkpoint and evaluates them again when it gets there
(each step once in the file), and evaluates its checkpoint's own step first if that point is
missing (a stop right after the step, before its evaluation).

>>> class Every:  # any callable (model, step) -> {name: number}
...     def __call__(self, model, step):
...         return {"answer": 42.0}
>>> periodic = Periodic(Every(), every=25)
>>> [s for s in range(1, 81) if periodic.due(s, last=80)]
[25, 50, 75, 80]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

from flax import nnx

from slim_jax.errors import ConfigError

EVALS_FILE = "evals.jsonl"


class EvaluateFn(Protocol):
    """Measures a model: `(model, step) -> {name: number}`. The model is in training mode (call
    `slim_jax.nn.inference_view` on it for inference) and must not be kept: it is a copy made
    for this call."""

    def __call__(self, model: nnx.Module, step: int) -> Mapping[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Periodic:
    """Evaluate every `every` optimiser steps and at the last step.

    Attributes:
      fn: what to measure.
      every: steps between evaluations (>= 1).
      file: the JSON-lines file in the trainer's `run_dir` that keeps the results.
    """

    fn: EvaluateFn
    every: int
    file: str = EVALS_FILE

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"evaluation every {self.every!r} steps: give an integer >= 1")

    def due(self, step: int, last: int) -> bool:
        """Whether `step` (1-based, after its update) is evaluated in a run of `last` steps."""
        return step > 0 and (step % self.every == 0 or step == last)
