"""Sliding clustering and weight yielding (SLIM.md s2).

Each adapted layer keeps C cluster centres `mu_c` and per-channel variances `var_c` of its inputs.
During training they follow the tokens by an exponential moving average; at inference they are
frozen. A token far from its nearest centre (in per-channel standard deviations) is out-of-domain
and yields routing weight to the identity experts.

Every function takes tokens as `x: [..., d_in]` (any leading axes) and is jit- and vmap-able. The
statistics are state, never parameters: `update_clusters` stops gradients on its inputs and output.
Everything is computed in float32 whatever the tokens' dtype, and distances to the centres as
`sum_j (x_j - mu_j)^2` directly: the expansion `|mu|^2 - 2 x.mu` cancels catastrophically when the
activations share a large offset (|x| ~ 50 picked the wrong centre for a quarter of the tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from slim_jax.errors import ConfigError, ShapeError


class ClusterStats(NamedTuple):
    """The cluster statistics of one layer.

    Attributes:
      mean: `[C, d_in]` centres mu_c.
      var: `[C, d_in]` per-channel variances sigma_c^2.
      count: `[]` int32, the number of batches absorbed; 0 means never initialised.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def empty_clusters(num_clusters: int, d_in: int) -> ClusterStats:
    """Statistics that have seen no data: zero centres, unit variances, `count = 0`.

    >>> empty_clusters(2, 3).mean.shape
    (2, 3)
    """
    if num_clusters < 1 or d_in < 1:
        raise ConfigError(f"num_clusters and d_in must be >= 1, got {num_clusters} and {d_in}")
    return ClusterStats(
        mean=jnp.zeros((num_clusters, d_in), jnp.float32),
        var=jnp.ones((num_clusters, d_in), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def _flatten(x: jax.Array, token_weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`x [..., d] -> [T, d]` float32 and weights `[T]` (ones when None)."""
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if token_weights is None:
        return flat, jnp.ones(flat.shape[0], jnp.float32)
    if token_weights.shape != x.shape[:-1]:
        raise ShapeError(
            f"token_weights must have the leading shape of x {x.shape[:-1]} (one weight per "
            f"token, 0 for padding), got {token_weights.shape}"
        )
    return flat, token_weights.reshape(-1).astype(jnp.float32)


def init_from_tokens(
    x: jax.Array, key: jax.Array, num_clusters: int, token_weights: jax.Array | None = None
) -> ClusterStats:
    """Initial statistics from a first batch: C random tokens as centres, the batch variance.

    SLIM.md s2: centres "randomly initialised from the first batch". Centres are C distinct tokens
    drawn uniformly among those with non-zero weight (padding is never drawn); every centre's
    variance is the weighted per-channel variance of the batch. When the batch holds fewer than
    C real tokens, real tokens are drawn with replacement. A batch without
    a real token (all weights 0: all padding) initialises nothing: it returns `empty_clusters`
    (`count = 0`), so the next batch with real tokens initialises instead.

    Args:
      x: `[..., d_in]` tokens.
      key: PRNG key.
      num_clusters: C.
      token_weights: `[...]` weight per token (0 = padding); None counts every token.

    Returns:
      `ClusterStats` with `count = 1` (0 when no token has weight).

    >>> x = jnp.arange(12.0).reshape(6, 2)
    >>> s = init_from_tokens(x, jax.random.key(0), 3)
    >>> s.mean.shape, s.var[0].tolist(), int(s.count)
    ((3, 2), [11.666..., 11.666...], 1)
    >>> int(init_from_tokens(x, jax.random.key(0), 3, jnp.zeros(6)).count)  # all padding
    0
    """
    flat, w = _flatten(x, token_weights)
    num_tokens = flat.shape[0]
    valid = (w > 0).astype(jnp.float32)
    probs = jnp.where(valid.sum() > 0, valid, 1.0)
    key, spare_key = jax.random.split(key)
    # With replacement, among the real tokens: for batches with fewer than C of them. Gumbel
    # argmax (`categorical`), not `random.choice(p=...)`, whose inverse-CDF search compiles to a
    # while loop in every SLIM layer's step (slow to compile, opaque to cost analysis).
    spare = jax.random.categorical(spare_key, jnp.log(probs), shape=(num_clusters,))
    if num_tokens >= num_clusters:
        # Gumbel top-k: C distinct tokens, uniform among weighted ones.
        logp = jnp.where(w > 0, 0.0, -jnp.inf)
        gumbel = jax.random.gumbel(key, (num_tokens,))
        _, index = jax.lax.top_k(logp + gumbel, num_clusters)
        index = jnp.where(w[index] > 0, index, spare)  # never a padding token as a centre
    else:
        index = spare
    total = jnp.maximum(w.sum(), 1e-12)
    batch_mean = (w @ flat) / total
    batch_var = (w @ jnp.square(flat - batch_mean)) / total
    real = w.sum() > 0
    empty = empty_clusters(num_clusters, flat.shape[1])
    stats = ClusterStats(
        mean=jnp.where(real, flat[index], empty.mean),
        var=jnp.where(real, jnp.broadcast_to(batch_var, empty.var.shape), empty.var),
        count=real.astype(jnp.int32),
    )
    return jax.tree.map(jax.lax.stop_gradient, stats)


def nearest_cluster(stats: ClusterStats, x: jax.Array) -> jax.Array:
    """Index of the nearest centre (Euclidean) of every token, in float32.

    `c*(x) = argmin_c sum_j (x_j - mu_c,j)^2`, summed as written (a fused elementwise reduction,
    `T C d_in` operations: cheap for the C = 8 of SLIM), never through `|mu|^2 - 2 x.mu`.

    Args:
      stats: cluster statistics, mean `[C, d_in]`.
      x: `[..., d_in]` tokens.

    Returns:
      `[...]` int32 in `[0, C)`.

    >>> s = ClusterStats(jnp.array([[0.0], [10.0]]), jnp.ones((2, 1)), jnp.array(1))
    >>> nearest_cluster(s, jnp.array([[1.0], [8.0]])).tolist()
    [0, 1]
    """
    x = x.astype(jnp.float32)
    mean = stats.mean.astype(jnp.float32)
    squared = jnp.sum(jnp.square(x[..., None, :] - mean), axis=-1)  # [..., C] = |x - mu_c|^2
    return jnp.argmin(squared, axis=-1).astype(jnp.int32)


def update_clusters(
    stats: ClusterStats,
    x: jax.Array,
    token_weights: jax.Array | None = None,
    momentum: float | jax.Array = 0.99,
) -> ClusterStats:
    """One sliding (EMA) update of the cluster statistics from a batch of tokens.

    SLIM.md s2, for every centre c that received tokens (weighted count n_c > 0):
      mu_c  <- m mu_c  + (1 - m) sum_t w_t x_t / n_c
      var_c <- m var_c + (1 - m) sum_t w_t (x_t - mu_c)^2 / n_c   (mu_c: the updated centre)
    where tokens are assigned to their nearest centre before the update. Centres without tokens
    keep their values; tokens with weight 0 (padding) count nowhere. No gradient flows through
    the update.

    Args:
      stats: current statistics.
      x: `[..., d_in]` tokens.
      token_weights: `[...]` weight per token (0 = padding); None counts every token.
      momentum: m in `[0, 1]` (checked when a Python number).

    Returns:
      The new `ClusterStats` (`count` incremented).

    >>> s = ClusterStats(jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.array(1))
    >>> update_clusters(s, jnp.array([[2.0], [4.0]]), momentum=0.5).mean.tolist()
    [[1.5]]
    """
    if isinstance(momentum, int | float) and not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"momentum must be in [0, 1], got {momentum}")
    stats = jax.tree.map(jax.lax.stop_gradient, stats)
    flat, w = _flatten(jax.lax.stop_gradient(x), token_weights)
    w = jax.lax.stop_gradient(w)
    num_clusters = stats.mean.shape[0]
    assign = nearest_cluster(stats, flat)  # [T]
    onehot = jax.nn.one_hot(assign, num_clusters, dtype=jnp.float32) * w[:, None]  # [T, C]
    n = onehot.sum(axis=0)  # [C]
    moved = n > 0
    safe_n = jnp.where(moved, n, 1.0)[:, None]
    batch_mean = (onehot.T @ flat) / safe_n  # [C, d]
    new_mean = momentum * stats.mean + (1.0 - momentum) * batch_mean
    mean = jnp.where(moved[:, None], new_mean, stats.mean)
    sq = jnp.square(flat - mean[assign])  # [T, d], around the updated centre
    batch_var = (onehot.T @ sq) / safe_n
    new_var = momentum * stats.var + (1.0 - momentum) * batch_var
    var = jnp.where(moved[:, None], new_var, stats.var)
    return ClusterStats(mean=mean, var=var, count=stats.count + 1)


def cluster_sigma(stats: ClusterStats, eps: float = 1e-6, sigma_floor: float = 0.0) -> jax.Array:
    """The per-channel standard deviations that z-scores divide by, floored relative to the layer.

    `sigma_c,j = sqrt(max(var_c,j, (f s)^2) + eps)`, with `s^2 = mean_{c,j} var_c,j` the layer's
    typical variance and f = `sigma_floor`: a dead channel (variance ~0) gets f times the typical
    standard deviation instead of `sqrt(eps)`, so a 0.01 wiggle in it is not read as 10 sigma.

    Args:
      stats: cluster statistics, var `[C, d_in]`.
      eps: added to the variance before the square root (numerical safety only).
      sigma_floor: f >= 0, relative to the layer's typical standard deviation (0: no floor).

    Returns:
      `[C, d_in]` float32.

    >>> s = ClusterStats(jnp.zeros((1, 4)), jnp.array([[0.0, 4.0, 4.0, 4.0]]), jnp.array(1))
    >>> cluster_sigma(s, eps=0.0, sigma_floor=0.5).tolist()  # typical sigma sqrt(3) ~ 1.73
    [[0.866..., 2.0, 2.0, 2.0]]
    """
    var = stats.var.astype(jnp.float32)
    floor = jnp.square(sigma_floor) * jnp.mean(var)  # (f s)^2
    return jnp.sqrt(jnp.maximum(var, floor) + eps)


def max_z(
    stats: ClusterStats, x: jax.Array, eps: float = 1e-6, sigma_floor: float = 0.0
) -> jax.Array:
    """The largest per-channel z-score of every token at its nearest centre c*.

    `max_j |x_j - mu_c*,j| / sigma_c*,j` with sigma from `cluster_sigma` (`sqrt(var + eps)`,
    floored at `sigma_floor` times the layer's typical standard deviation); `distance` subtracts
    the threshold from it. Computed in float32 whatever the dtype of `x`.

    Args:
      stats: cluster statistics.
      x: `[..., d_in]` tokens.
      eps: added to the variance before the square root.
      sigma_floor: see `cluster_sigma`.

    Returns:
      `[...]` float32.

    >>> s = ClusterStats(jnp.zeros((1, 2)), jnp.full((1, 2), 4.0), jnp.array(1))
    >>> max_z(s, jnp.array([[0.0, 6.0]]), eps=0.0).tolist()
    [3.0]
    """
    x = x.astype(jnp.float32)
    c = nearest_cluster(stats, x)
    sigma = cluster_sigma(stats, eps, sigma_floor)
    z = jnp.abs(x - stats.mean.astype(jnp.float32)[c]) / sigma[c]
    return jnp.max(z, axis=-1)


def token_quantile(
    values: jax.Array, q: float, token_weights: jax.Array | None = None
) -> jax.Array:
    """The q-quantile of per-token values over the tokens with non-zero weight.

    The lower order statistic: the value at rank `floor(q * (n - 1))` of the n counted tokens
    in ascending order (padding never counts). With no counted token, the quantile of all.

    Args:
      values: `[...]` one value per token.
      q: the quantile, in `(0, 1)`.
      token_weights: `[...]` weight per token (0 = padding); None counts every token.

    Returns:
      `[]` float32.

    >>> token_quantile(jnp.array([4.0, 1.0, 3.0, 2.0, 99.0]), 0.5,
    ...                jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])).tolist()
    2.0
    """
    if not 0.0 < q < 1.0:
        raise ConfigError(f"quantile q must be in (0, 1), got {q}")
    flat = values.reshape(-1).astype(jnp.float32)
    if token_weights is None:
        valid = jnp.ones(flat.shape, bool)
    else:
        if token_weights.shape != values.shape:
            raise ShapeError(f"token_weights must have the shape of values {values.shape}, got "
                             f"{token_weights.shape}")
        valid = token_weights.reshape(-1) > 0
        valid = jnp.where(valid.any(), valid, True)
    n = valid.sum()
    ordered = jnp.sort(jnp.where(valid, flat, jnp.inf))  # counted tokens first, ascending
    rank = jnp.floor(q * (n - 1)).astype(jnp.int32)
    return ordered[rank]


def distance(
    stats: ClusterStats,
    x: jax.Array,
    eps: float = 1e-6,
    threshold: float | jax.Array = 1.0,
    sigma_floor: float = 0.0,
) -> jax.Array:
    """The out-of-domain distance of every token to its nearest centre c*.

    SLIM.md s2: `d(x) = max_j |x_j - mu_c*,j| / sigma_c*,j - t`, with `sigma = sqrt(var + eps)`
    and the threshold `t = 1` of the spec: the largest per-channel z-score minus t, positive when
    some channel lies beyond t sigma. The maximum runs over all d_in channels, so for a token drawn
    from the cluster's own Gaussian it grows with d_in (its median is about 2.55 for d_in = 64 and
    3.76 for d_in = 4096); a larger `t` keeps such in-domain tokens from yielding.

    Args:
      stats: cluster statistics.
      x: `[..., d_in]` tokens.
      eps: added to the variance before the square root.
      threshold: t, in standard deviations (`SlimConfig.yield_threshold`).
      sigma_floor: see `cluster_sigma` (`SlimConfig.cluster_sigma_floor`).

    Returns:
      `[...]` float32 distances.

    >>> s = ClusterStats(jnp.zeros((1, 2)), jnp.full((1, 2), 4.0), jnp.array(1))
    >>> distance(s, jnp.array([[0.0, 6.0], [1.0, 0.0]]), eps=0.0).tolist()
    [2.0, -0.5]
    >>> distance(s, jnp.array([[0.0, 6.0]]), eps=0.0, threshold=3.0).tolist()
    [0.0]
    """
    return max_z(stats, x, eps, sigma_floor) - threshold


def yield_logits(
    logits: jax.Array, d: jax.Array, num_identity: int, strength: float | jax.Array = 1.0
) -> jax.Array:
    """Additive weight yielding: push router logits towards the identity experts when `d > 0`.

    SLIM.md s2: `logits'_i = logits_i + lambda * max(d(x), 0)` for every identity expert i (the
    last `num_identity` columns); LoRA logits are unchanged. A token within one sigma of its
    centre (`d <= 0`) is left alone.

    Args:
      logits: `[..., E_l + E_i]` router logits.
      d: `[...]` distances from `distance`.
      num_identity: E_i; 0 returns the logits unchanged.
      strength: lambda.

    Returns:
      `[..., E_l + E_i]` logits.

    >>> yield_logits(jnp.zeros(3), jnp.array(2.0), 1, 0.5).tolist()
    [0.0, 0.0, 1.0]
    """
    num_experts = logits.shape[-1]
    if not 0 <= num_identity <= num_experts:
        raise ConfigError(
            f"num_identity must be between 0 and the number of experts ({num_experts}), "
            f"got {num_identity}"
        )
    if d.shape != logits.shape[:-1]:
        raise ShapeError(f"d must have shape {logits.shape[:-1]} (one per token), got {d.shape}")
    push = strength * jnp.maximum(d, 0.0)[..., None]
    is_identity = jnp.arange(num_experts) >= num_experts - num_identity
    return logits + jnp.where(is_identity, push, 0.0).astype(logits.dtype)
