"""LoRAHub's objective: the few-shot loss of a composition plus an L1 term (LORAHUB.md s3).

    objective(w) = loss(w) + l1_coeff * mean_i |w_i|,   l1_coeff = 0.05

`loss` comes in two modes:
- "compat" (default) reproduces the reference exactly: the K examples are cut into batches
  (`batch_size`, default K: one batch), each batch's loss is the token-mean cross-entropy over
  all its target tokens (the target's EOS counts, padding does not), those batch losses are summed
  and the sum divided by K. With one batch this is the token-mean CE / K, which makes the L1 term
  relatively K times stronger than with a plain mean; the reference's numbers need that.
- "mean": the plain per-example mean, `(1/K) sum_k mean_t CE_kt`, independent of the batching.

The K examples are tokenised once (`slim_jax.data` layouts: a causal LM scores only the target
tokens after the prompt; an encoder-decoder model scores the decoder's targets) and held as arrays
`[num_batches, batch_size, length]`, so `Objective` is a pytree that one `jax.jit` takes whole.
`Objective.population(w [P, N])` scores P candidates in one `jax.vmap`ped forward: only the rank-r
factors differ per candidate, the frozen base is shared, never copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from slim_jax.data import CausalLayout, EncoderDecoderLayout, Example, tokenize_examples
from slim_jax.data.layout import Layout, TokenizedExample
from slim_jax.errors import ConfigError, DataError
from slim_jax.lorahub.candidates import EXAMPLE_AXIS, POPULATION_AXIS
from slim_jax.lorahub.library import AttachedLibrary
from slim_jax.tokenizer import Tokenizer

LossMode = Literal["compat", "mean"]
LOSS_MODES = ("compat", "mean")
L1_COEFF = 0.05
MAX_LENGTH = 2048


def objective_layout(model: nnx.Module, tokenizer: Tokenizer,
                     max_length: int = MAX_LENGTH) -> Layout:
    """The batch layout of the ADAPT examples for `model`, truncating at `max_length` tokens.

    Encoder-decoder: inputs and targets each at most `max_length` (the reference's 2048).
    Decoder-only: prompt + target at most `min(max_length, max_position_embeddings)` positions
    (the prompt loses its start first). Row lengths are 4, 6, 8, 12, 16, 24, 32, 48, ... (powers
    of two and 1.5x them: at most a third of a row is padding, so a 2-7 token answer is padded to
    at most 8, as the reference pads to the longest example), and tasks of similar lengths share
    one compiled objective.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1, max_position_embeddings=128)
    >>> objective_layout(Llama(cfg, rngs=nnx.Rngs(0)), ByteTokenizer()).lengths
    ((4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128),)
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 tokens, got {max_length}")
    if model.layout == "encoder_decoder":  # slim_jax.models.family.ModelFamily
        lengths = _bucket_lengths(max_length)
        return EncoderDecoderLayout(tokenizer, enc_lengths=lengths, dec_lengths=lengths)
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    return CausalLayout(tokenizer, lengths=_bucket_lengths(limit))


def _bucket_lengths(limit: int) -> tuple[int, ...]:
    steps = sorted({base << k for base in (4, 6) for k in range(32)})
    return (*(n for n in steps if n < limit), limit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Objective:
    """The ADAPT objective of one task over one module library (a pytree; jit takes it whole).

    Attributes:
      library: the base model split for composition (`ModuleLibrary.attach`).
      batches: the K examples as standard batch arrays `[num_batches, batch_size, ...]`; rows
        beyond K in the last batch are padding (no target tokens).
      num_examples: K.
      mode: "compat" or "mean" (module docstring).
      l1_coeff: weight of `mean_i |w_i|`.
      example_axis: inside `population`'s `jax.shard_map` only: the mesh axis the batches' rows
        are split over; each batch's sums are then reduced over it (`jax.lax.psum`).
    """

    library: AttachedLibrary
    batches: Mapping[str, jax.Array]
    num_examples: int = dataclasses.field(metadata={"static": True})
    mode: LossMode = dataclasses.field(default="compat", metadata={"static": True})
    l1_coeff: float = dataclasses.field(default=L1_COEFF, metadata={"static": True})
    example_axis: str | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def num_modules(self) -> int:
        """N, the length of a weight vector."""
        return self.library.num_modules

    def loss(self, weights: jax.Array) -> jax.Array:
        """The few-shot loss of the composition `weights [N]`, `[]` float32 (module docstring)."""
        model = self.library.model(weights)

        def batch_terms(batch: Mapping[str, jax.Array]) -> jax.Array:
            logits = model.batch_logits(batch)  # [batch, length, vocab]
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["targets"])
            mask = batch["target_mask"].astype(jnp.float32)
            per_row, tokens = jnp.sum(ce * mask, axis=-1), jnp.sum(mask, axis=-1)  # [batch]
            if self.mode == "compat":
                # LORAHUB.md s3: the batch's token-mean CE over all of its target tokens.
                total, count = self._sum((jnp.sum(per_row), jnp.sum(tokens)))
                return total / jnp.maximum(count, 1.0)
            # Plain mean: every example's own token mean; padding rows add 0.
            return self._sum(jnp.sum(per_row / jnp.maximum(tokens, 1.0)))

        # Sum over batches, divided by K (both modes).
        return jnp.sum(jax.lax.map(batch_terms, self.batches)) / self.num_examples

    def penalty(self, weights: jax.Array) -> jax.Array:
        """LORAHUB.md s3: `l1_coeff * mean_i |w_i|`."""
        return self.l1_coeff * jnp.mean(jnp.abs(weights))

    def __call__(self, weights: jax.Array) -> jax.Array:
        """`objective(w) = loss(w) + l1_coeff * mean|w|` for `weights [N]`, `[]` float32."""
        weights = jnp.asarray(weights, jnp.float32)
        return self.loss(weights) + self.penalty(weights)

    def _sum(self, terms):
        """`terms` summed over the rows' shards (`example_axis`), or as they are."""
        return terms if self.example_axis is None else jax.lax.psum(terms, self.example_axis)

    def population(self, weights: jax.Array, *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = POPULATION_AXIS) -> jax.Array:
        """Objectives of P candidates `weights [P, N]` -> `[P]`, in one vmapped forward pass.

        The base state is an unbatched input of the `jax.vmap`, so every candidate reads the one
        copy; only the composed rank-r factors carry the population axis. With `mesh`, the
        population is split over the mesh `axis` (`jax.shard_map`; P must divide evenly) and
        each device scores its share against its replica of the base; a mesh axis `fsdp` of
        size > 1 (`population_mesh`'s `EXAMPLE_AXIS`) splits every batch's rows too (padded
        with empty rows to a multiple of it: they add no target token), each device scoring
        its rows and the sums reduced over the axis.
        """
        ways = 1 if mesh is None else mesh.shape.get(EXAMPLE_AXIS, 1)
        if ways == 1:
            return vmapped_population(self, weights, mesh=mesh, axis=axis)
        rows = next(iter(self.batches.values())).shape[1]
        pad = -rows % ways
        batches = {key: jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))
                   for key, v in self.batches.items()}
        split = dataclasses.replace(self, batches=batches, example_axis=EXAMPLE_AXIS)
        specs = dataclasses.replace(  # a prefix of `split`: the library whole on every device
            split, library=PartitionSpec(),
            batches={key: PartitionSpec(None, EXAMPLE_AXIS) for key in batches})
        return vmapped_population(split, weights, mesh=mesh, axis=axis, objective_spec=specs)


def vmapped_population(objective: Callable[[jax.Array], jax.Array], weights: jax.Array, *,
                       mesh: Mesh | None = None,
                       axis: str | tuple[str, ...] = POPULATION_AXIS,
                       objective_spec: Any = None) -> jax.Array:
    """`[P]` values of a pytree `objective` (`objective(w [N]) -> []`) at `weights [P, N]`, in
    one `jax.vmap` over the candidates (the objective itself is shared, unbatched); with `mesh`,
    the population is split over the mesh `axis` (`jax.shard_map`; P must divide evenly), the
    objective laid out by `objective_spec` (a `PartitionSpec` prefix of it; default: whole on
    every device).

    >>> from slim_jax.lorahub.toy import QuadraticObjective
    >>> vmapped_population(QuadraticObjective.around([1.0, 0.0]), jnp.eye(2)).tolist()
    [0.0, 2.0]
    """
    weights = jnp.asarray(weights, jnp.float32)
    score = jax.vmap(lambda obj, w: obj(w), in_axes=(None, 0))
    if mesh is None:
        return score(objective, weights)
    spec = PartitionSpec(axis)
    in_spec = PartitionSpec() if objective_spec is None else objective_spec
    return jax.shard_map(score, mesh=mesh, in_specs=(in_spec, spec),
                         out_specs=spec)(objective, weights)


def build_objective(
    library: AttachedLibrary,
    examples: Sequence[Example] | Sequence[TokenizedExample],
    layout: Layout,
    *,
    batch_size: int | None = None,
    mode: LossMode = "compat",
    l1_coeff: float = L1_COEFF,
) -> Objective:
    """The objective of the K ADAPT `examples` for the library attached to a model.

    Args:
      library: from `ModuleLibrary.attach(model)`.
      examples: the K examples: `Example(prompt, target)` (tokenised and truncated with `layout`)
        or already tokenised ones.
      layout: the model family's batch layout (`objective_layout`).
      batch_size: examples per batch; None means K (the reference's default, one batch).
      mode: "compat" (the reference's loss) or "mean" (the plain per-example mean).
      l1_coeff: the L1 weight (the reference's 0.05).

    Raises:
      ConfigError: no examples, a batch size below 1, an unknown mode or a negative l1_coeff.
      DataError: an example with no target token left after truncation.

    >>> from slim_jax.data import ByteTokenizer
    >>> from slim_jax.lorahub.library import LoRAModule, ModuleLibrary
    >>> from slim_jax.models.llama import Llama, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=16, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> mods = [LoRAModule(f"m{i}", 2, 4.0, {"layers/0/self_attn/q_proj":
    ...         (np.full((8, 2), 0.1 * i), np.full((2, 8), 0.1))}) for i in range(3)]
    >>> attached = ModuleLibrary.from_modules(mods).attach(model)
    >>> objective = build_objective(attached, [Example("1+1=", "2"), Example("2+2=", "4")],
    ...                             objective_layout(model, ByteTokenizer()))
    >>> objective.population(jnp.zeros((4, 3))).shape
    (4,)
    """
    if mode not in LOSS_MODES:
        raise ConfigError(f"objective mode must be one of {LOSS_MODES}, got {mode!r}")
    if l1_coeff < 0:
        raise ConfigError(f"l1_coeff must be >= 0, got {l1_coeff}")
    if not examples:
        raise ConfigError("the objective needs at least one ADAPT example, got none")
    k = len(examples)
    batch_size = k if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (or None for all K={k} in one), got "
                          f"{batch_size}")
    batch_size = min(batch_size, k)
    if isinstance(examples[0], TokenizedExample):
        tokenized = [layout.fit(e) for e in examples]  # type: ignore[arg-type]
    else:
        tokenized = tokenize_examples(examples, layout)  # type: ignore[arg-type]
    for i, example in enumerate(tokenized):
        if len(example.response) == 0:
            raise DataError(f"ADAPT example {i} has no target token left after truncation")
    rows = [[e] for e in tokenized]
    shape = layout.bucket_for(rows)  # one shape for every batch
    num_batches = -(-k // batch_size)
    padded = rows + [[] for _ in range(num_batches * batch_size - k)]
    built = [layout.build(padded[i * batch_size:(i + 1) * batch_size], shape)
             for i in range(num_batches)]
    batches = {key: jnp.asarray(np.stack([b[key] for b in built])) for key in built[0]}
    return Objective(library, batches, k, mode, float(l1_coeff))
