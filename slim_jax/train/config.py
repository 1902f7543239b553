"""Configuration of a training run: the optimiser and the loop, as frozen dataclasses."""

from __future__ import annotations

import dataclasses
import os

from slim_jax.errors import ConfigError
from slim_jax.parallel import DEFAULT_RULES, MeshConfig, Rules

FROZEN_DTYPES = ("auto", "float32", "bfloat16", "float16", "keep")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay, global-norm clipping.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warm-up from 0 over this many updates.
      final_lr_ratio: the cosine decays to `final_lr_ratio * learning_rate` at the last step.
      weight_decay: AdamW's decoupled weight decay (on every trained parameter).
      b1, b2, eps: Adam moments' decay rates and denominator epsilon.
      clip_norm: clip the gradient to this global L2 norm; None turns clipping off.
    """

    learning_rate: float = 2e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ConfigError(f"must be > 0, got {self.learning_rate}", field="learning_rate")
        if self.warmup_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup_steps}", field="warmup_steps")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"must be in [0, 1], got {self.final_lr_ratio}",
                              field="final_lr_ratio")
        if self.weight_decay < 0:
            raise ConfigError(f"must be >= 0, got {self.weight_decay}", field="weight_decay")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)}", field=name)
        if not self.eps > 0:
            raise ConfigError(f"must be > 0, got {self.eps}", field="eps")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"must be > 0 or None (off), got {self.clip_norm}",
                              field="clip_norm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
      steps: optimiser updates in the run (the cosine schedule ends here).
      grad_accum_steps: micro-batches per update; each global batch is split into this many,
        their gradients summed before the update (the loss is the mean over all target tokens
        of the global batch, exactly as without accumulation).
      l1_coeff: weight of the SLIM L1 adapter penalty (SLIM.md s4); 0 turns it off.
      frozen_dtype: dtype of the frozen base: "auto" casts it to bfloat16 on TPU/GPU and keeps it
        on CPU, "keep" never casts, or a dtype name. Adapters always train in float32.
      log_every: write metrics every this many steps.
      save_every: checkpoint every this many steps (and at the end, and on SIGTERM); 0: only
        those two.
      keep_checkpoints: how many of the newest checkpoints to keep.
      async_checkpoint: write checkpoints in the background.
      run_dir: where `metrics.jsonl`, `loss.png` and `checkpoints/` go; None writes nothing.
      progress: show a progress bar (process 0 only).
      peak_flops_per_device: peak FLOP/s of one device for the MFU estimate; None looks the
        device kind up (TPU/GPU) and leaves MFU out where unknown (CPU).
      mesh: the device mesh sizes.
      rules: logical-axis sharding rules.
      optimizer: the optimiser.
    """

    steps: int = 1000
    grad_accum_steps: int = 1
    l1_coeff: float = 0.0
    frozen_dtype: str = "auto"
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    run_dir: str | os.PathLike[str] | None = None
    progress: bool = True
    peak_flops_per_device: float | None = None
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rules: Rules = DEFAULT_RULES
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)

    def __post_init__(self) -> None:
        for name, least in (("steps", 1), ("grad_accum_steps", 1), ("log_every", 1),
                            ("save_every", 0), ("keep_checkpoints", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"must be >= {least}, got {getattr(self, name)}", field=name)
        if self.l1_coeff < 0:
            raise ConfigError(f"must be >= 0, got {self.l1_coeff}", field="l1_coeff")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"must be one of {', '.join(FROZEN_DTYPES)}, got "
                              f"{self.frozen_dtype!r}", field="frozen_dtype")
