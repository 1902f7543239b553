"""One optimiser update: loss, adapter-only gradients, AdamW; under `jax.jit` with shardings.

    L = sum_t mask_t * CE_t / sum_t mask_t  +  l1_coeff * L1(adapters)          (SLIM.md s4)

The CE sum runs over every target token of the global batch and is divided by their global count,
so the loss (and gradient) is the same whatever the mesh or the number of micro-batches. With
gradient accumulation the global batch is split into `micro_steps` micro-batches, scanned with
`jax.lax.scan`: gradients are summed, cluster statistics are carried from one to the next.

A step whose loss or gradient norm is not finite leaves the state unchanged and reports
`finite = False`; the loop then stops the run, naming the step and its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slim_jax.parallel import DEFAULT_RULES, Rules, batch_axes, mesh_context, tree_shardings
from slim_jax.train.forward import masked_batch_logits
from slim_jax.train.loss import target_cross_entropy
from slim_jax.train.state import Filter, TrainState

Batch = Mapping[str, jax.Array]
Forward = Callable[[nnx.Module, Batch], jax.Array]
Penalty = Callable[[nnx.State], jax.Array]
METRICS = ("loss", "ce", "l1", "grad_norm", "target_tokens", "finite")


@dataclasses.dataclass(frozen=True)
class StepDefinition:
    """The static parts of a train step (hashable pieces of the computation, not arrays).

    Attributes:
      graphdef: the model's graph definition (`split_model`).
      tx: the optax transformation.
      wrt: filter of the trained variables (as given to `split_model`).
      forward: `(model, batch) -> logits [b, s, vocab]`; the default calls `batch_logits` with
        padding masked out of SLIM's cluster updates.
      penalty: `params -> []` penalty of the trained state (the SLIM L1, `adapter_l1`), or None.
      l1_coeff: weight of `penalty` in the loss.
      micro_steps: gradient-accumulation micro-batches per step.
    """

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    wrt: Filter = nnx.LoRAParam
    forward: Forward = masked_batch_logits
    penalty: Penalty | None = None
    l1_coeff: float = 0.0
    micro_steps: int = 1


@dataclasses.dataclass(frozen=True)
class MeshJit:
    """A jitted function traced, lowered and called with its mesh and rules set
    (`slim_jax.parallel.mesh_context`: `jax.set_mesh` and the logical-axis rules).

    `jax.set_mesh` works only outside `jax.jit`, and the mesh in context is part of what a jit
    traces, so both the call and `lower` enter it. Inside, the models' activation constraints
    (`slim_jax.parallel.constrain`, by logical axis) see the mesh and `rules` and take effect;
    without a mesh they are inert.

    Attributes:
      fn: the `jax.jit`-wrapped function.
      mesh: the device mesh of its shardings.
      rules: the logical-axis rules of its shardings, for the activation constraints.
    """

    fn: Any
    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __call__(self, *args: Any) -> Any:
        with mesh_context(self.mesh, self.rules):
            return self.fn(*args)

    def lower(self, *args: Any) -> Any:
        """`fn.lower(*args)` under the mesh (ahead-of-time compilation: `.compile()` it)."""
        with mesh_context(self.mesh, self.rules):
            return self.fn.lower(*args)


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def train_step(
    definition: StepDefinition,
    state: TrainState,
    frozen: nnx.State,
    batch: Batch,
    micro_sharding: NamedSharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of `state` on `batch` (a pure function: jit it, see `compile_train_step`).

    Args:
      definition: the static step definition.
      state: the current `TrainState`.
      frozen: the frozen base parameters.
      batch: the standard batch dict, `[global_batch, ...]` arrays with `targets` and `target_mask`.
      micro_sharding: sharding of a `[micro_steps, micro_batch, ...]` split batch (None: unsharded).

    Returns:
      `(new_state, metrics)`; metrics are scalars named in `METRICS`. (Example: see
      `compile_train_step`.)
    """
    d = definition
    target_tokens = jnp.sum(batch["target_mask"].astype(jnp.float32))
    denominator = jnp.maximum(target_tokens, 1.0)

    def ce_loss(params: nnx.State, mutable: nnx.State, micro: Batch):
        # Fresh Variables at this trace level: the forward pass writes cluster and RNG state.
        model = nnx.merge(d.graphdef, params, frozen, mutable, copy=True)
        logits = d.forward(model, micro)
        ce_sum = target_cross_entropy(logits, micro["targets"], micro["target_mask"])
        new_mutable = nnx.split(model, d.wrt, nnx.Param, ...)[3]
        return ce_sum / denominator, new_mutable

    ce_grad = jax.value_and_grad(ce_loss, has_aux=True)
    if d.micro_steps == 1:
        (ce, mutable), grads = ce_grad(state.params, state.mutable, batch)
    else:
        k = d.micro_steps

        def split(x: jax.Array) -> jax.Array:
            # Row i*k + j goes to micro-batch j: each device's rows stay on that device.
            x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
            if micro_sharding is None:
                return x
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        def accumulate(carry, micro):
            grads, mutable, ce = carry
            (micro_ce, mutable), micro_grads = ce_grad(state.params, mutable, micro)
            return (jax.tree.map(jnp.add, grads, micro_grads), mutable, ce + micro_ce), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, state.mutable, jnp.zeros((), jnp.float32))
        (grads, mutable, ce), _ = jax.lax.scan(accumulate, init, jax.tree.map(split, batch))

    l1 = jnp.zeros((), jnp.float32)
    if d.penalty is not None and d.l1_coeff > 0:
        l1, l1_grads = jax.value_and_grad(d.penalty)(state.params)
        grads = jax.tree.map(lambda g, h: g + d.l1_coeff * h, grads, l1_grads)
    loss = ce + d.l1_coeff * l1
    # ||g||_2 over every trained array (what clip_by_global_norm clips).
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    updates, opt_state = d.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(state.step + 1, params, mutable, opt_state)
    metrics = {
        "loss": loss,
        "ce": ce,
        "l1": l1,
        "grad_norm": grad_norm,
        "target_tokens": target_tokens,
        "finite": finite,
    }
    return _select(finite, new_state, state), metrics


def compile_train_step(
    definition: StepDefinition,
    state: TrainState,
    frozen: nnx.State,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> MeshJit:
    """`train_step` under `jax.jit` with explicit in/out shardings and the state donated, traced
    and called under `mesh_context(mesh, rules)` (`MeshJit`) so the model's activation
    constraints apply with the run's rules.

    The state and frozen shardings come from the variables' logical axes (`tree_shardings`); the
    batch is split along dimension 0 over the batch mesh axes; metrics are replicated. The state's
    buffers are donated, so an update happens in place.

    Args:
      definition: the static step definition.
      state, frozen: (abstract or concrete) trees giving the structure to shard.
      mesh: the device mesh.
      rules: logical-axis rules.

    Returns:
      `step(state, frozen, batch) -> (state, metrics)`; `state` must not be used after the call.
      `step.lower(state, frozen, batch)` lowers it ahead of time (abstract arguments allowed).

    >>> import optax
    >>> from slim_jax.parallel import MeshConfig, make_mesh
    >>> from slim_jax.train.state import split_model
    >>> class Bigram(nnx.Module):  # logits of the next token from a trainable table
    ...     def __init__(self):
    ...         self.table = nnx.LoRAParam(jnp.zeros((4, 4)))
    ...     def batch_logits(self, batch):
    ...         return self.table[...][batch["tokens"]]
    >>> graphdef, params, frozen, mutable = split_model(Bigram())
    >>> tx = optax.sgd(1.0)
    >>> state = TrainState(jnp.zeros((), jnp.int32), params, mutable, tx.init(params))
    >>> definition = StepDefinition(graphdef, tx, forward=lambda m, b: m.batch_logits(b))
    >>> mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    >>> step = compile_train_step(definition, state, frozen, mesh)
    >>> batch = {"tokens": jnp.array([[0, 1]]), "targets": jnp.array([[1, 2]]),
    ...          "target_mask": jnp.ones((1, 2))}
    >>> state, metrics = step(state, frozen, batch)
    >>> round(float(metrics["loss"]), 4), int(state.step)  # log(4): uniform before the update
    (1.3863, 1)
    """
    axes = batch_axes(rules)
    state_sharding = tree_shardings(state, mesh, rules)
    frozen_sharding = tree_shardings(frozen, mesh, rules)
    batch_sharding = NamedSharding(mesh, PartitionSpec(axes))
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, axes))
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, frozen: nnx.State, batch: Batch):
        return train_step(definition, state, frozen, batch, micro_sharding)

    return MeshJit(jax.jit(
        step,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    ), mesh, rules)
