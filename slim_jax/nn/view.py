"""The two modes of an adapted model, as views that share its variables (`nnx.view`).

- `inference_view`: dropout off, SLIM cluster statistics frozen (dynamic merging still draws
  fresh masks: SLIM.md s3); what evaluation, generation and serving run.
- `training_view`: dropout on, cluster statistics follow the data; what the trainer runs.

>>> from slim_jax.nn import SlimConfig, SlimLinear
>>> layer = SlimLinear(2, 2, SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(0))
>>> inference_view(layer).use_running_average, layer.use_running_average
(True, False)
>>> training_view(inference_view(layer)).use_running_average
False
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def inference_view(model: M) -> M:
    """`model` in inference mode, sharing its variables: dropout off, SLIM cluster statistics
    frozen (`deterministic=True, use_running_average=True`)."""
    return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def training_view(model: M) -> M:
    """`model` in training mode, sharing its variables: dropout on, SLIM cluster statistics
    updated from the tokens seen."""
    return nnx.view(model, deterministic=False, use_running_average=False,
                    raise_if_not_found=False)
