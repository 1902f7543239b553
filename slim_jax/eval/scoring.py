"""Running a model for evaluation: inference mode, jitted batch functions, sequence likelihoods.

Every evaluation forward pass goes through `apply_model`: the model is split into its parameters
and the rest of its state (RNG counts, SLIM cluster statistics), one jitted program per
(function, model structure, batch shape) runs it, and the updated rest is written back, so SLIM's
dynamic-merging masks are redrawn on every call (SLIM.md s3) and nothing is recompiled between
calls of the same shape. Parameters are inputs only, never copied out. Generation
(`slim_jax.models.generate`) threads the same state through its decoding loop, so masks are
redrawn on every forward pass there too.
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
from slim_jax.models.functional import call_split, split_model
from slim_jax.parallel.rules import Rules
from slim_jax.parallel.sharding import activation_rules, current_rules, mesh_context, model_mesh

Batch = Mapping[str, jax.Array]



def require_causal(model: nnx.Module, what: str) -> None:
    """Refuse a model whose family is not decoder-only: evaluation builds causal-LM rows.

    Reads the family's `layout` (`slim_jax.models.family.ModelFamily`); a plain NNX model
    without one is taken to be causal (it reads the causal batch keys).

    >>> from slim_jax.models.t5 import T5, T5Config
    >>> t5 = nnx.eval_shape(lambda: T5(T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=4,
    ...     num_layers=1, num_decoder_layers=1, num_heads=2), rngs=nnx.Rngs(0)))
    >>> try:
    ...     require_causal(t5, "scoring")
    ... except ConfigError as err:
    ...     print(str(err)[:46])
    scoring scores decoder-only (causal) models; t
    """
    layout = getattr(model, "layout", "causal")
    if layout != "causal":
        raise ConfigError(f"{what} scores decoder-only (causal) models; this "
                          f"{type(model).__name__} is an {layout} model: score it with "
                          "slim_jax.lorahub (encoder-decoder tasks) or a decoder-only model")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(fn: Callable[..., Any], graphdef: nnx.GraphDef, rules: Rules, params: nnx.State,
           rest: nnx.State, *args: Any) -> tuple[Any, nnx.State]:
    with activation_rules(rules):  # static: one compiled program per set of rules
        return call_split(graphdef, params, rest, lambda model: fn(model, *args))


def apply_model(model: nnx.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(model, *args)` under `jax.jit`, writing the model's non-parameter state back.

    Args:
      model: any NNX model (pass `slim_jax.nn.inference_view(model)` for inference).
      fn: a module-level function `(model, *args) -> pytree of arrays` (hashable: the compiled
        program is cached per function, model structure and argument shapes).
      *args: array arguments (batches).

    >>> from slim_jax.nn import LoRAConfig, LoRALinear
    >>> layer = LoRALinear(3, 2, LoRAConfig(rank=1), rngs=nnx.Rngs(0))
    >>> apply_model(layer, lambda m, x: m(x), jnp.ones((4, 3))).shape
    (4, 2)
    """
    graphdef, params, rest = split_model(model)
    # A model sharded over a mesh runs under it, as the Trainer's step does: its activation
    # constraints take effect (with the rules of an enclosing `mesh_context`, else the defaults).
    mesh = model_mesh(params)
    with mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
        out, rest = _apply(fn, graphdef, current_rules(), params, rest, *args)
    nnx.update(model, rest)
    return out


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
      model: a causal LM with `batch_logits` (use `inference_view(model)` for inference mode).
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
    require_causal(model, "sequence_log_likelihoods")
    sums, counts = [], []
    for batch, rows in ordered_batches(examples, layout, batch_size):
        total, count = apply_model(model, _row_log_likelihood, batch)
        sums.append(np.asarray(total)[:rows])
        counts.append(np.asarray(count)[:rows])
    if not sums:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(sums), np.concatenate(counts)
