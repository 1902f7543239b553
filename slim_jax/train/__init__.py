"""Sharded adapter training: configuration, optimiser, the jitted step, the loop.

Files, one job each: `config` (dataclasses), `optimizer` (AdamW, warm-up + cosine, clipping),
`loss` (target cross-entropy), `forward` (logits with SLIM token masks), `state` (TrainState,
splitting the model), `step` (one update under `jax.jit`), `trainer` (the `Trainer`: sharded
state, step, save/restore), `loop` (the fit loop), `metrics` (MFU, JSONL), `progress` (bar),
`plot` (loss curve), `evaluation` (measuring along training), `preemption` (stop signals:
SIGTERM, SIGINT, SLURM's SIGUSR1).
"""

from slim_jax.train.config import OptimizerConfig, TrainConfig
from slim_jax.train.evaluation import EvaluateFn, Periodic
from slim_jax.train.forward import masked_batch_logits
from slim_jax.train.loop import (
    NonFiniteLossError,
    ResumableBatches,
    TrainingInterrupted,
    TrainResult,
)
from slim_jax.train.loss import target_cross_entropy
from slim_jax.train.metrics import MetricsLog, read_metrics, training_flops_per_token
from slim_jax.train.optimizer import learning_rate_schedule, make_optimizer
from slim_jax.train.plot import plot_loss
from slim_jax.train.preemption import PreemptionGuard
from slim_jax.train.state import TrainState, cast_floating, merge_model, split_model
from slim_jax.train.step import StepDefinition, compile_train_step, train_step
from slim_jax.train.trainer import Trainer

__all__ = [
    "EvaluateFn",
    "MetricsLog",
    "NonFiniteLossError",
    "OptimizerConfig",
    "Periodic",
    "PreemptionGuard",
    "ResumableBatches",
    "StepDefinition",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingInterrupted",
    "cast_floating",
    "compile_train_step",
    "learning_rate_schedule",
    "make_optimizer",
    "masked_batch_logits",
    "merge_model",
    "plot_loss",
    "read_metrics",
    "split_model",
    "target_cross_entropy",
    "train_step",
    "training_flops_per_token",
]
