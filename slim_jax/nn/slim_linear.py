"""`SlimLinear`: an `nnx.Linear` plus SLIM's mixture of LoRA and identity experts (SLIM.md s1-3)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from slim_jax.core.clustering import (
    ClusterStats,
    empty_clusters,
    init_from_tokens,
    max_z,
    token_quantile,
    update_clusters,
    yield_logits,
)
from slim_jax.core.dropmerge import channel_masks, masked_mixture_delta
from slim_jax.core.lora import init_lora_a, init_lora_b
from slim_jax.core.routing import dense_weights, lora_mixture_delta, top_k_weights
from slim_jax.errors import ShapeError
from slim_jax.nn._base import adopt_linear, compute_dtype, fork_stream, kernel_axes
from slim_jax.nn.config import SlimConfig
from slim_jax.nn.variables import AdapterParam, ClusterState, TokenMask

RNG_COLLECTION = "slim"


class SlimLinear(nnx.Linear):
    """A linear layer with SLIM's soft mixture of LoRA and identity experts.

    SLIM.md s1: `y = x W + b + sum_e g_e * scale * (x A_e) B_e`, where `g` are top-k (or dense)
    softmax gates of the router logits `x R`, after weight yielding (s2) pushes tokens far from
    the layer's input clusters towards the identity experts (the last E_i router columns, which
    add nothing). At inference, dynamic merging (s3) masks input and output channels of the delta.

    Variables (the base's `kernel`/`bias` keep their names and paths):
      experts_a `[E_l, d_in, r]`, experts_b `[E_l, r, d_out]`, router `[d_in, E_l + E_i]`:
        `AdapterParam` (no router for a single expert);
      cluster_mean, cluster_var `[C, d_in]`, cluster_count `[]`: `ClusterState` (with yielding);
      yield_cutoff `[]`: `ClusterState`, the running quantile threshold (with `yield_quantile`);
      token_mask: `TokenMask`, token weights for the cluster update (see `set_token_mask`).

    Modes, as `nnx.BatchNorm` (`model.train()`, `model.eval()`, `nnx.view(model, ...)`):
      `use_running_average=False` (training): the cluster statistics follow the tokens by EMA
        (initialised from the first batch with a real token); no masking.
      `use_running_average=True` (inference): statistics frozen; with `dropmerge_p > 0` fresh
        channel masks are drawn on every call from the module's random stream (collection
        "slim", reseed with `nnx.reseed(model, slim=seed)`). A layer whose clusters never saw
        data does not yield.

    Under `nnx.capture(model, nnx.Intermediate)` the gates `[..., E_l + E_i]` are sown as
    `routing_weights`.

    Args:
      in_features, out_features: d_in, d_out.
      config: the SLIM layer.
      rngs: initialises the experts and router (stream `params`) and seeds the layer's own
        stream tagged "slim" from `rngs.slim` (or `rngs.default`), for cluster initialisation and
        dynamic-merging masks.
      base: an existing `nnx.Linear` to adapt (prefer `SlimLinear.from_linear`).
      use_running_average: the initial mode.

    >>> cfg = SlimConfig(num_lora_experts=2, num_identity_experts=1, top_k=2, rank=2, alpha=4,
    ...                  num_clusters=2)
    >>> layer = SlimLinear(3, 4, cfg, rngs=nnx.Rngs(0))
    >>> layer.experts_a.shape, layer.router.shape, layer(jnp.ones((2, 5, 3))).shape
    ((2, 3, 2), (3, 3), (2, 5, 4))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: SlimConfig,
        *,
        rngs: nnx.Rngs,
        base: nnx.Linear | None = None,
        use_running_average: bool = False,
        **linear_kwargs: Any,
    ):
        adopt_linear(self, in_features, out_features, base, rngs, linear_kwargs)
        self.config = config
        self.scale = config.scale
        self.use_running_average = use_running_average
        in_axis, out_axis = kernel_axes(self.kernel)
        dtype = jnp.dtype(config.param_dtype)
        num_lora, rank = config.num_lora_experts, config.rank
        self.experts_a = AdapterParam(
            init_lora_a(rngs.params(), (num_lora, in_features, rank), config.init_a, dtype),
            logical_axes=("experts", in_axis, "lora_rank"),
        )
        self.experts_b = AdapterParam(
            init_lora_b((num_lora, rank, out_features), dtype),
            logical_axes=("experts", "lora_rank", out_axis),
        )
        if config.has_router:
            router = jax.random.normal(rngs.params(), (in_features, config.num_experts))
            self.router = AdapterParam(
                (router * config.router_init_std).astype(dtype),
                logical_axes=(in_axis, "experts"),
            )
        else:
            self.router = nnx.data(None)
        if config.yielding:
            stats = empty_clusters(config.num_clusters, in_features)
            self.cluster_mean = ClusterState(stats.mean, logical_axes=("cluster", in_axis))
            self.cluster_var = ClusterState(stats.var, logical_axes=("cluster", in_axis))
            self.cluster_count = ClusterState(stats.count, logical_axes=())
            if config.yield_quantile is not None:
                self.yield_cutoff = ClusterState(
                    jnp.asarray(config.yield_threshold, jnp.float32), logical_axes=()
                )
        self.token_mask = TokenMask(None)
        if config.yielding or config.dropmerge_p > 0:
            self.rngs = fork_stream(rngs, RNG_COLLECTION, "SlimLinear")
        else:
            self.rngs = nnx.data(None)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, config: SlimConfig, *, rngs: nnx.Rngs) -> SlimLinear:
        """Adapt an existing `nnx.Linear`, sharing its `kernel` and `bias` Variables.

        >>> base = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        >>> layer = SlimLinear.from_linear(base, SlimConfig(rank=2), rngs=nnx.Rngs(1))
        >>> layer.kernel is base.kernel
        True
        """
        return cls(linear.in_features, linear.out_features, config, rngs=rngs, base=linear)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by `nnx.view`: `use_running_average=True` is the inference mode."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    @property
    def cluster_stats(self) -> ClusterStats | None:
        """The current cluster statistics (None without yielding)."""
        if not self.config.yielding:
            return None
        return ClusterStats(self.cluster_mean[...], self.cluster_var[...], self.cluster_count[...])

    def _token_weights(self, x: jax.Array, token_mask: jax.Array | None) -> jax.Array | None:
        mask = token_mask if token_mask is not None else self.token_mask.get_value()
        if mask is None:
            return None
        if mask.shape != x.shape[:-1]:
            raise ShapeError(
                f"SlimLinear got a token mask of shape {mask.shape} for inputs of shape {x.shape}; "
                f"the mask must match the inputs' leading axes {x.shape[:-1]} (use "
                "set_token_mask(model, mask, pattern=...) to mask only the layers that see "
                "these tokens)"
            )
        return mask.astype(jnp.float32)

    def _clusters(self, x: jax.Array, token_mask: jax.Array | None) -> ClusterStats:
        """The statistics to measure distances with; in training, updated first (SLIM.md s2)."""
        stats = self.cluster_stats
        assert stats is not None
        if self.use_running_average:
            return stats
        weights = self._token_weights(x, token_mask)
        key = self.rngs()
        cfg = self.config
        stats = jax.lax.cond(
            stats.count > 0,
            lambda: update_clusters(stats, x, weights, cfg.momentum),
            lambda: init_from_tokens(x, key, cfg.num_clusters, weights),
        )
        self.cluster_mean[...] = stats.mean
        self.cluster_var[...] = stats.var
        self.cluster_count[...] = stats.count
        return stats

    def _threshold(
        self, z: jax.Array, inputs: jax.Array, token_mask: jax.Array | None
    ) -> jax.Array | float:
        """t of `d(x) = max_j |z_j| - t`: the fixed `yield_threshold`, or the running quantile
        of `z` (`[...]`, the max_j |z_j| of `inputs`), updated first in training mode."""
        cfg = self.config
        if cfg.yield_quantile is None:
            return cfg.yield_threshold
        if not self.use_running_average:
            # EMA of the batch's q-quantile (SlimConfig.yield_quantile), started from the batch
            # that initialised the clusters (count 1 after this call's update); kept while the
            # clusters wait for a batch with real tokens (count 0).
            weights = self._token_weights(inputs, token_mask)
            batch = token_quantile(z, cfg.yield_quantile, weights)
            old, m, count = self.yield_cutoff[...], cfg.momentum, self.cluster_count[...]
            ema = jnp.where(count == 1, batch, m * old + (1.0 - m) * batch)
            self.yield_cutoff[...] = jnp.where(count > 0, ema, old)
        return self.yield_cutoff[...]

    def routing_weights(self, inputs: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """The gates `[..., E_l + E_i]` of every token (updates the clusters in training mode)."""
        cfg = self.config
        if self.router is None:
            return jnp.ones((*inputs.shape[:-1], 1), jnp.float32)
        # Router logits in float32 whatever the compute dtype: top-k and yielding compare them.
        logits = jnp.matmul(inputs.astype(jnp.float32), self.router[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        if cfg.yielding:
            stats = self._clusters(inputs, token_mask)
            # Distances are state-derived signals: no gradient flows through them.
            # SLIM.md s2: d(x) = max_j |x_j - mu_c*,j| / sigma_c*,j - t (t = 1 in the spec),
            # `core.clustering.distance` with the max z-scores computed once for t as well.
            z = jax.lax.stop_gradient(
                max_z(stats, inputs, cfg.cluster_eps, cfg.cluster_sigma_floor))
            d = z - self._threshold(z, inputs, token_mask)
            d = jnp.where(stats.count > 0, d, 0.0)  # never-trained clusters do not yield
            logits = yield_logits(logits, d, cfg.num_identity_experts, cfg.yield_strength)
        if cfg.dense_routing:
            return dense_weights(logits)
        return top_k_weights(logits, cfg.top_k)

    def __call__(
        self,
        inputs: jax.Array,
        out_sharding: Any = None,
        *,
        token_mask: jax.Array | None = None,
    ) -> jax.Array:
        """`inputs [..., d_in] -> [..., d_out]`.

        Args:
          inputs: `[..., d_in]`.
          out_sharding: passed to the base matmul, as in `nnx.Linear`.
          token_mask: `[...]` token weights for the cluster update (0 = padding); overrides
            the layer's `token_mask` variable for this call.
        """
        cfg = self.config
        gates = self.routing_weights(inputs, token_mask)
        if hasattr(self, "__captures__"):  # only under nnx.capture
            self.sow(nnx.Intermediate, "routing_weights", gates)
        dtype = compute_dtype(cfg.dtype, self.dtype, inputs, self.experts_a[...])
        lead = inputs.shape[:-1]
        if out_sharding is None:
            # One [tokens, d_in] matrix for the base and the experts: their backward products
            # (x^T dY) contract one axis, without relayouts of the activations.
            inputs = inputs.reshape(-1, inputs.shape[-1])
            gates = gates.reshape(-1, gates.shape[-1])
        y = super().__call__(inputs, out_sharding=out_sharding)
        x = inputs.astype(dtype)
        a = self.experts_a[...].astype(dtype)
        b = self.experts_b[...].astype(dtype)
        lora_gates = gates[..., : cfg.num_lora_experts].astype(dtype)
        if self.use_running_average and cfg.dropmerge_p > 0:
            masks = channel_masks(self.rngs(), self.in_features, self.out_features, cfg.dropmerge_p)
            delta = masked_mixture_delta(
                x, a, b, lora_gates, self.scale, masks, cfg.dropmerge_p,
                rescale=cfg.dropmerge_rescale,
            )
        else:
            delta = lora_mixture_delta(x, a, b, lora_gates, self.scale)
        return (y + delta.astype(y.dtype)).reshape(*lead, y.shape[-1])
