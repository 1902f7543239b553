"""The optimiser: global-norm clipping, then AdamW on a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import optax

from slim_jax.train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up `0 -> lr` over `warmup_steps`, then cosine `lr -> final_lr_ratio * lr`.

    lr(t) = lr * t / W for t < W; then lr * (a + (1 - a) * (1 + cos(pi * (t - W) / (T - W))) / 2),
    a = final_lr_ratio, T = total_steps.

    >>> sched = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=2,
    ...                                                final_lr_ratio=0.0), total_steps=4)
    >>> [round(float(sched(t)), 3) for t in range(5)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup = min(config.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_ratio,
    )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """`clip_by_global_norm(clip_norm)` then `adamw` on `learning_rate_schedule`.

    >>> import jax.numpy as jnp
    >>> tx = make_optimizer(OptimizerConfig(), total_steps=10)
    >>> params = {"w": jnp.zeros(3)}
    >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> updates["w"].tolist()  # step 0 of the warm-up: learning rate 0
    [0.0, 0.0, 0.0]
    """
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
