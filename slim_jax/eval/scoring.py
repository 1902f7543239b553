"""Running a model for evaluation: inference mode, jitted batch functions, sequence likelihoods.

Every evaluation forward pass goes through `apply_model`: the model is split into its parameters
and the rest of its state (RNG counts, SLIM cluster statistics), one jitted program per
(function, model structure, batch shape) runs it, and the updated rest is written back, so SLIM's
dynamic-merging masks are redrawn on every call (SLIM.md s3) and nothing is recompiled between
calls of the same shape. Parameters are inputs only, never copied out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.data import BatchIterator, CausalLayout, TokenizedExample
from slim_jax.errors import ConfigError
from slim_jax.nn import SlimLinear, adapted_layers

Batch = Mapping[str, jax.Array]


def eval_view(model: nnx.Module) -> nnx.Module:
    """`model` in inference mode, sharing its variables: dropout off, SLIM cluster statistics
    frozen and dynamic merging on (`use_running_average=True`).

    >>> from slim_jax.nn import SlimConfig, SlimLinear
    >>> layer = SlimLinear(2, 2, SlimConfig(rank=1, num_clusters=1), rngs=nnx.Rngs(0))
    >>> eval_view(layer).use_running_average, layer.use_running_average
    (True, False)
    """
    return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(fn: Callable[..., Any], graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
           *args: Any) -> tuple[Any, nnx.State]:
    model = nnx.merge(graphdef, params, rest)
    out = fn(model, *args)
    return out, nnx.state(model, nnx.Not(nnx.Param))


def apply_model(model: nnx.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(model, *args)` under `jax.jit`, writing the model's non-parameter state back.

    Args:
      model: any NNX model (pass `eval_view(model)` for inference).
      fn: a module-level function `(model, *args) -> pytree of arrays` (hashable: the compiled
        program is cached per function, model structure and argument shapes).
      *args: array arguments (batches).

    >>> from slim_jax.nn import LoRAConfig, LoRALinear
    >>> layer = LoRALinear(3, 2, LoRAConfig(rank=1), rngs=nnx.Rngs(0))
    >>> apply_model(layer, lambda m, x: m(x), jnp.ones((4, 3))).shape
    (4, 2)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out, rest = _apply(fn, graphdef, params, rest, *args)
    nnx.update(model, rest)
    return out


class _FrozenStream(nnx.Module):
    """Stands in for a random stream: returns one fixed key and never advances."""

    def __init__(self, key: jax.Array):
        self.key_data = nnx.Variable(jax.random.key_data(key))

    def __call__(self) -> jax.Array:
        return jax.random.wrap_key_data(self.key_data[...])


@contextlib.contextmanager
def one_merge_per_call(model: nnx.Module) -> Iterator[int]:
    """Within the block, every SLIM layer with dynamic merging uses one mask pair per layer.

    `slim_jax.models.generate` runs its decoding loop on a model whose random streams it cannot
    advance inside the loop (the loop does not carry NNX state). Here each such layer draws one
    key from its own stream (so successive blocks get fresh masks, reproducibly) and uses it for
    every forward pass of the block: the dynamically merged model `W + M * delta W` (SLIM.md s3)
    is drawn once per generation call and kept while the continuation is written. Yields the
    number of layers frozen; layers are restored on exit.

    >>> from slim_jax.nn import SlimConfig
    >>> layer = SlimLinear(2, 2, SlimConfig(rank=1, num_clusters=1, dropmerge_p=0.5),
    ...                    rngs=nnx.Rngs(0), use_running_average=True)
    >>> with one_merge_per_call(nnx.List([layer])) as frozen:
    ...     same = bool((layer(jnp.ones((1, 2))) == layer(jnp.ones((1, 2)))).all())
    >>> frozen, same, type(layer.rngs).__name__
    (1, True, 'RngStream')
    """
    layers = [layer for layer in adapted_layers(model).values()
              if isinstance(layer, SlimLinear) and layer.config.dropmerge_p > 0
              and layer.use_running_average]
    streams = [layer.rngs for layer in layers]
    try:
        for layer, stream in zip(layers, streams, strict=True):
            layer.rngs = _FrozenStream(stream())
        yield len(layers)
    finally:
        for layer, stream in zip(layers, streams, strict=True):
            layer.rngs = stream


def target_log_probs(model: nnx.Module, batch: Batch) -> jax.Array:
    """`log p(targets[b, t] | tokens[b, :t+1])`, `[batch, seq]` float32 (causal-LM batch keys)."""
    logits = model.batch_logits(batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]


def _row_log_likelihood(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per row: sum of target log-probabilities under `target_mask`, and the number of targets."""
    mask = batch["target_mask"].astype(jnp.float32)
    return jnp.sum(target_log_probs(model, batch) * mask, axis=1), jnp.sum(mask, axis=1)


def ordered_batches(
    examples: Sequence[TokenizedExample], layout: CausalLayout, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """`(batch, rows)`: the examples in order, one per row, `batch_size` rows per batch (the last
    padded with empty rows, which have no targets); `rows` counts the real ones."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        return
    batches = BatchIterator(examples, layout, global_batch_size=batch_size, shuffle=False,
                            drop_remainder=False, num_epochs=1)
    left = len(examples)
    for batch in batches:
        yield batch, min(left, batch_size)
        left -= batch_size


def sequence_log_likelihoods(
    model: nnx.Module,
    examples: Sequence[TokenizedExample],
    layout: CausalLayout,
    *,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of each example's response given its prompt.

    Args:
      model: a causal LM with `batch_logits` (use `eval_view(model)` for inference mode).
      examples: tokenised (prompt, response) pairs, fitted to `layout`.
      layout: builds the rows; its lengths are the compiled shapes.
      batch_size: rows per forward pass.

    Returns:
      `(sums [n], counts [n])`: summed response-token log-probabilities (EOS included) and how
      many tokens each sum covers.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=8,
    ...                   intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1)
    >>> layout = CausalLayout(ByteTokenizer(), lengths=(16,))
    >>> pairs = [layout.encode("Q:", r) for r in ("a", "bcd")]
    >>> sums, counts = sequence_log_likelihoods(Llama(cfg, rngs=nnx.Rngs(0)), pairs, layout)
    >>> counts.tolist(), bool((sums < 0).all())
    ([2.0, 4.0], True)
    """
    sums, counts = [], []
    for batch, rows in ordered_batches(examples, layout, batch_size):
        total, count = apply_model(model, _row_log_likelihood, batch)
        sums.append(np.asarray(total)[:rows])
        counts.append(np.asarray(count)[:rows])
    if not sums:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(sums), np.concatenate(counts)
