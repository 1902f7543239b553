"""Frozen configurations of the adapted layers, validated on construction.

Every ablation of SLIM.md s1 is a field value:
- no identity experts (MixLoRA-like): `num_identity_experts=0, yielding=False`;
- yielding off: `yielding=False`;
- dynamic merging off: `dropmerge_p=0.0` (the default);
- dense soft mixture (k = all): `dense_routing=True`;
- plain LoRA inside SLIM: `num_lora_experts=1, num_identity_experts=0, top_k=1, yielding=False`
  (a single expert needs no router, and none is created).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from slim_jax.core.lora import INIT_A_METHODS, lora_scale
from slim_jax.errors import ConfigError

DType = Any  # a jnp dtype or its name ("float32", "bfloat16")


def _check_dtype(name: str, value: DType | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"must be a floating dtype such as 'float32', got {value!r}", field=name)


def _check_lora_fields(cfg: LoRAConfig | SlimConfig) -> None:
    if not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise ConfigError(f"must be an integer >= 1, got {cfg.rank!r}", field="rank")
    if not cfg.alpha > 0:
        raise ConfigError(f"must be > 0, got {cfg.alpha!r}", field="alpha")
    if cfg.init_a not in INIT_A_METHODS:
        raise ConfigError(f"must be one of {', '.join(INIT_A_METHODS)}, got {cfg.init_a!r}",
                          field="init_a")
    _check_dtype("param_dtype", cfg.param_dtype, optional=False)
    _check_dtype("dtype", cfg.dtype, optional=True)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """A LoRA adapter: `y = x W + b + alpha/r * (dropout(x) A) B`.

    Attributes:
      rank: r, at least 1.
      alpha: LoRA alpha; the scale is `alpha / r` (or `alpha / sqrt(r)` with `rslora`).
      rslora: rank-stabilised scaling.
      init_a: "kaiming_uniform" (PEFT default) or "gaussian" (std 1/r); B starts at zero.
      dropout: dropout rate on the adapter's input (PEFT's `lora_dropout`), in `[0, 1)`.
      param_dtype: storage dtype of the adapter factors (float32 by default, whatever the base).
      dtype: compute dtype of the adapter path; None uses the base layer's `dtype` (or promotion).

    >>> LoRAConfig(rank=8, alpha=16).scale
    2.0
    """

    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    init_a: str = "kaiming_uniform"
    dropout: float = 0.0
    param_dtype: DType = "float32"
    dtype: DType | None = None

    def __post_init__(self) -> None:
        _check_lora_fields(self)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout!r}", field="dropout")

    @property
    def scale(self) -> float:
        """The LoRA scale `alpha / r` (or `alpha / sqrt(r)`)."""
        return lora_scale(self.alpha, self.rank, rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class SlimConfig:
    """A SLIM layer (SLIM.md s1-s3): LoRA experts, identity experts, soft router, yielding,
    dynamic merging.

    Attributes:
      num_lora_experts: E_l, at least 1.
      num_identity_experts: E_i, at least 0; they are the last E_i router columns.
      top_k: experts per token, `1 <= top_k <= E_l + E_i` (ignored by dense routing).
      dense_routing: softmax over every expert (the `k = all` ablation).
      rank, alpha, rslora, init_a: the LoRA experts, as in `LoRAConfig`.
      router_init_std: the router R `[d_in, E_l + E_i]` starts at `N(0, std^2)`.
      yielding: weight yielding with sliding clustering (SLIM.md s2); needs identity experts.
      num_clusters: C, cluster centres per layer.
      momentum: m of the EMA update, in `[0, 1]`.
      yield_strength: lambda, added as `lambda * max(d, 0)` to the identity logits; >= 0.
      yield_threshold: t of `d(x) = max_j |x_j - mu_j| / sigma_j - t`, in standard deviations,
        >= 0. The spec's reading is t = 1; the maximum over d_in channels of a token from the
        cluster's own Gaussian has a median of about 2.5 at d_in = 64 (3.8 at 4096), so with
        t = 1 nearly every token, in-domain too, yields. A larger t yields only far tokens.
      yield_quantile: None (the spec: the fixed `yield_threshold`) or q in (0, 1): then each
        layer's t is a running estimate of the q-quantile of `max_j |x_j - mu_j| / sigma_j` over
        its training tokens (EMA with `momentum`, started from the first batch; kept as the
        `ClusterState` `yield_cutoff`), so that about a fraction 1 - q of in-domain tokens
        yield whatever d_in and the tails of the layer's activations. A calibration of the
        spec's distance, not in the paper.
      cluster_eps: added to the variances in `d(x)` (numerical safety only).
      cluster_sigma_floor: f >= 0: in `d(x)` no channel's sigma is below f times the layer's
        typical standard deviation (the root mean of its cluster variances), so a dead channel
        (variance ~0) does not turn a tiny deviation into a huge z-score; 0 turns it off
        (`core.clustering.cluster_sigma`).
      dropmerge_p: dynamic-merging drop rate p in `[0, 1)`, used at inference; 0 turns it off.
      dropmerge_rescale: DARE's `1 / (1 - p)` rescale of the masked delta.
      param_dtype, dtype: as in `LoRAConfig`.

    >>> cfg = SlimConfig(num_lora_experts=4, num_identity_experts=1, rank=4, alpha=8)
    >>> cfg.num_experts, cfg.scale, cfg.has_router
    (5, 2.0, True)
    """

    num_lora_experts: int = 8
    num_identity_experts: int = 2
    top_k: int = 2
    dense_routing: bool = False
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    init_a: str = "kaiming_uniform"
    router_init_std: float = 0.02
    yielding: bool = True
    num_clusters: int = 8
    momentum: float = 0.99
    yield_strength: float = 1.0
    yield_threshold: float = 1.0
    yield_quantile: float | None = None
    cluster_eps: float = 1e-6
    cluster_sigma_floor: float = 0.1
    dropmerge_p: float = 0.0
    dropmerge_rescale: bool = True
    param_dtype: DType = "float32"
    dtype: DType | None = None

    def __post_init__(self) -> None:
        _check_lora_fields(self)
        if not isinstance(self.num_lora_experts, int) or self.num_lora_experts < 1:
            raise ConfigError(f"must be an integer >= 1, got {self.num_lora_experts!r}",
                              field="num_lora_experts")
        if not isinstance(self.num_identity_experts, int) or self.num_identity_experts < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.num_identity_experts!r}",
                              field="num_identity_experts")
        if not self.dense_routing and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"must be between 1 and the number of experts (LoRA plus identity experts: "
                f"{self.num_experts}), got {self.top_k} (or turn dense routing on)", field="top_k")
        if self.router_init_std < 0:
            raise ConfigError(f"must be >= 0, got {self.router_init_std!r}",
                              field="router_init_std")
        if self.yielding and self.num_identity_experts == 0:
            raise ConfigError(
                "must be >= 1 while yielding is on (tokens yield to identity experts); turn "
                "yielding off for the no-identity ablation", field="num_identity_experts")
        if not isinstance(self.num_clusters, int) or self.num_clusters < 1:
            raise ConfigError(f"must be an integer >= 1, got {self.num_clusters!r}",
                              field="num_clusters")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.momentum!r}", field="momentum")
        if not self.yield_strength >= 0:
            raise ConfigError(f"must be >= 0, got {self.yield_strength!r}",
                              field="yield_strength")
        if not 0.0 <= self.yield_threshold < float("inf"):
            raise ConfigError(
                f"must be a finite number >= 0 (standard deviations beyond which a token "
                f"yields; the spec's is 1.0), got {self.yield_threshold!r}",
                field="yield_threshold")
        if self.yield_quantile is not None and not 0.0 < self.yield_quantile < 1.0:
            raise ConfigError(
                f"must be None (the fixed yield threshold) or in (0, 1) (the share of in-domain "
                f"tokens that do not yield), got {self.yield_quantile!r}", field="yield_quantile")
        if not self.cluster_eps > 0:
            raise ConfigError(f"must be > 0, got {self.cluster_eps!r}", field="cluster_eps")
        if not self.cluster_sigma_floor >= 0:
            raise ConfigError(f"must be >= 0 (a fraction of the layer's typical standard "
                              f"deviation), got {self.cluster_sigma_floor!r}",
                              field="cluster_sigma_floor")
        if not 0.0 <= self.dropmerge_p < 1.0:
            raise ConfigError(
                f"must be in [0, 1) (the fraction of the delta dropped), got {self.dropmerge_p!r}",
                field="dropmerge_p")

    @property
    def num_experts(self) -> int:
        """E_l + E_i: the router's output width."""
        return self.num_lora_experts + self.num_identity_experts

    @property
    def has_router(self) -> bool:
        """False only for a single expert (plain LoRA), which needs no routing."""
        return self.num_experts > 1

    @property
    def scale(self) -> float:
        """The LoRA scale of every expert."""
        return lora_scale(self.alpha, self.rank, rslora=self.rslora)
