"""Compile-only runs of LoRAHub's programs: population scoring and greedy generation.

The same measurement as `slim_jax.train.aot` (memory and FLOPs per chip of the compiled
program), for the two programs a LoRAHub run spends its time in:

- scoring a population of P candidate weightings (`slim_jax.lorahub.search.score_population`:
  one vmapped forward pass of the K ADAPT examples per candidate, laid out by
  `population_mesh`: the candidates over the most chips that divide P, each candidate's
  examples over the rest of the slice, every chip holding a replica of the base and the module
  library);
- greedy generation of the answers with the composed (merged) model, on one chip, as
  `slim_jax.lorahub.predict.greedy_answers` runs it.

Both are forward passes: their model FLOPs (for the MFU bound) are `2 N` per token of each
parameter the token passes through (`slim_jax.train.metrics.forward_flops`, the forward term of
the trainer's estimate), padding included. Scoring counts, per candidate, the base and the
composed rank-r adapter over the K examples; generation the base over the prompts and every
new token, as a call that decodes `max_new_tokens` for every row (one whose rows all stop
earlier does less, and its compiled FLOPs are counted the same way: "at most").
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from slim_jax.errors import ConfigError
from slim_jax.lorahub.library import ModuleLibrary
from slim_jax.lorahub.objective import Objective
from slim_jax.lorahub.search import population_mesh, score_population
from slim_jax.models.functional import split_model
from slim_jax.models.generate import generation_program
from slim_jax.nn import module_path
from slim_jax.nn.stack import per_layer_view
from slim_jax.parallel.mesh import MeshConfig, make_mesh
from slim_jax.parallel.topology import Topology
from slim_jax.train.aot import CompileReport, bytes_per_chip, compile_program
from slim_jax.train.metrics import forward_flops


def _replicated(tree, mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def compile_population(
    factory: Callable[[], nnx.Module], topo: Topology, *, population: int, num_modules: int,
    rank: int, alpha: float, targets: str, num_examples: int, input_len: int, target_len: int,
) -> CompileReport:
    """Scoring of `population` candidates over `num_modules` LoRA modules, compiled for `topo`.

    Args:
      factory: builds the base model (`slim_jax.train.aot.model_factory`).
      topo: the topology; the program spans it as `population_mesh` lays a run out (the
        candidates, then each candidate's example rows, over the chips).
      population: P, candidates scored in one call.
      num_modules, rank, alpha, targets: the module library (N modules of rank r on the layers
        whose path matches `targets`).
      num_examples: K, the ADAPT examples (one batch, as the reference).
      input_len, target_len: the padded lengths: encoder input and decoder target
        (encoder-decoder), or prompt + target row and unused (decoder-only).
    """
    pattern = re.compile(targets)

    def attached():
        model = factory()
        shapes = {module_path(p): (m.in_features, m.out_features)
                  for p, m in nnx.iter_modules(per_layer_view(model))  # per-layer paths
                  if type(m) is nnx.Linear and pattern.search(module_path(p))}
        if not shapes:
            raise ConfigError(f"targets {targets!r} match no linear layer of the model")
        a = {p: jnp.zeros((num_modules, d_in, rank)) for p, (d_in, _) in shapes.items()}
        b = {p: jnp.zeros((num_modules, rank, d_out)) for p, (_, d_out) in shapes.items()}
        names = tuple(f"module{i}" for i in range(num_modules))
        return ModuleLibrary(names, rank, alpha, False, a, b).attach(model)

    library = jax.eval_shape(attached)
    # One candidate's model: the base with the composed adapter (`AttachedLibrary.model`).
    candidate = nnx.eval_shape(lambda: attached().model(jnp.zeros(num_modules)))
    k = num_examples
    if candidate.layout == "encoder_decoder":  # models.family.ModelFamily
        lengths = {"enc_tokens": input_len, "enc_segment_ids": input_len,
                   "dec_tokens": target_len, "dec_segment_ids": target_len,
                   "targets": target_len, "target_mask": target_len}
        tokens = {"enc_segment_ids": k * input_len, "dec_segment_ids": k * target_len}
    else:
        lengths = dict.fromkeys(("tokens", "positions", "segment_ids", "targets", "target_mask"),
                                input_len)
        tokens = {"segment_ids": k * input_len}
    batches = {key: jax.ShapeDtypeStruct((1, k, n), jnp.float32 if key == "target_mask"
                                         else jnp.int32) for key, n in lengths.items()}
    objective = Objective(library, batches, k)
    weights = jax.ShapeDtypeStruct((population, num_modules), jnp.float32)
    mesh = population_mesh(population, list(topo.devices))
    if mesh is None:  # one chip
        mesh = make_mesh(MeshConfig(data=1), topo.devices[:1])
    replicated = (_replicated(objective, mesh), NamedSharding(mesh, PartitionSpec()))
    kinds = {"base": bytes_per_chip(library.rest, _replicated(library.rest, mesh)),
             "library": bytes_per_chip(library.stacked, _replicated(library.stacked, mesh)),
             "batch": bytes_per_chip(batches, _replicated(batches, mesh))}
    return compile_program(
        f"population scoring P={population}",
        lambda obj, w: score_population(obj, w, mesh=mesh), (objective, weights), replicated,
        topo, mesh, kinds=kinds,
        model_flops=forward_flops(candidate, tokens) * population / mesh.size)


def compile_generation(
    factory: Callable[[], nnx.Module], topo: Topology, *, batch_size: int, input_len: int,
    max_new_tokens: int,
) -> CompileReport:
    """Greedy decoding of `batch_size` prompts of `input_len` tokens, on one chip of `topo`.

    The model is the composed one (LoRA merged into the kernels: the base's shapes). FLOPs and
    model FLOPs are those of a call in which no row stops before `max_new_tokens`.
    """
    model = nnx.eval_shape(factory)
    graphdef, params, rest = split_model(model)
    cfg = model.config
    settings = (("max_new_tokens", max_new_tokens), ("temperature", 0.0), ("top_p", 1.0),
                ("stop_ids", tuple(int(s) for s in cfg.eos_ids)), ("pad_id", int(cfg.pad_id or 0)))
    tokens = jax.ShapeDtypeStruct((batch_size, input_len), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    mesh = make_mesh(MeshConfig(data=1), topo.devices[:1])
    kinds = {"base": bytes_per_chip(params, _replicated(params, mesh))}
    # The prompts through the model once (prefill), then one token per row and step; the first
    # new token comes from the prefill (an encoder-decoder's decoder starts from its start token).
    if model.layout == "encoder_decoder":
        seen = {"enc_segment_ids": batch_size * input_len,
                "dec_segment_ids": batch_size * max_new_tokens}
    else:
        seen = {"segment_ids": batch_size * (input_len + max_new_tokens - 1)}

    def generate(params, rest, tokens, segments, key):
        return generation_program(graphdef, params, rest, tokens, segments, key,
                                  settings=settings)  # what `models.generate.generate` runs

    args = (params, rest, tokens, tokens, key)
    return compile_program(f"greedy generation b={batch_size}", generate, args,
                           tuple(_replicated(a, mesh) for a in args), topo, mesh, kinds=kinds,
                           model_flops=forward_flops(model, seen))
