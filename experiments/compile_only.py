"""`--compile-only --topology NAME`: the experiments' programs compiled for a topology, no weights.

`slim_finetune` compiles the training step of every method of the run (`--methods` to choose);
`lorahub_bbh` compiles population scoring at P = 16 and 64 and greedy generation. The model is
built from its architecture alone: a built-in one for the hub ids the presets name (Llama-3-8B
shapes for the pod presets' OpenChat-3.6-8B, FLAN-T5-large), else the `config.json` of
`--model.path` (a local folder or `gs://`). Prints memory per chip by kind, FLOPs, the step time
at peak and the MFU bound, compile time; the last line is `fits: X.X of Y.Y GiB per chip` or
`does not fit: ...`, and the exit status 0 or 1 says the same (`slim_jax.train.aot`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.lorahub.aot import compile_generation, compile_population
from slim_jax.models.registry import config_from_hf
from slim_jax.parallel.topology import topology
from slim_jax.train.aot import (
    architecture,
    compile_train_step,
    model_factory,
    report,
)

# Hub ids of the presets, and the built-in architecture (`slim_jax.train.aot`) each one has.
KNOWN_MODELS = {
    "openchat/openchat-3.6-8b-20240522": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "google/flan-t5-large": "flan-t5-large",
}
POPULATIONS = (16, 64)


def _factory(model_spec: Any) -> Any:
    path = model_spec.path
    if getattr(model_spec, "kind", "hf") == "llama2c":
        raise ConfigError("--compile-only builds Hugging Face architectures (a config.json or a "
                          f"built-in one: {', '.join(KNOWN_MODELS)}); {path!r} is a llama2.c "
                          "checkpoint")
    arch = architecture(KNOWN_MODELS.get(path, path))
    # `--model.remat` / `--model.scan-layers` as set; one line when the family's config lacks one.
    fields = {f.name for f in dataclasses.fields(config_from_hf(arch, source=path))}
    return model_factory(arch, dtype=model_spec.dtype, param_dtype=model_spec.param_dtype,
                         overrides=model_spec.config_overrides(fields))


def _check(config: Any) -> None:
    if not config.topology:
        raise ConfigError("--compile-only needs --topology NAME (e.g. v5e-16, v5p-64, cpu-8)")


def slim_compile_only(config: Any) -> int:
    """Compile each method's training step of a `SlimExperiment`; print; 0 when all fit."""
    from experiments.slim_methods import make_method, target_shapes
    from slim_jax.nn import inject

    _check(config)
    topo = topology(config.topology)
    factory = _factory(config.model)
    shapes = target_shapes(nnx.eval_shape(factory), config.targets)

    def reports():  # one by one, each printed as soon as it is compiled
        for name in config.methods:
            method = make_method(name, config.slim, shapes)

            def adapted(method=method):
                model = factory()
                inject(model, config.targets, method.adapter, rngs=nnx.Rngs(0))
                return model

            train = dataclasses.replace(config.train,
                                        l1_coeff=config.train.l1_coeff if method.l1 else 0.0)
            r = compile_train_step(nnx.eval_shape(adapted), topo, train,
                                   batch_size=config.data.batch_size, seq_len=config.data.seq_len)
            yield dataclasses.replace(r, program=f"{name} train step")

    return report(reports())


def lorahub_compile_only(config: Any) -> int:
    """Compile a `LoRAHubExperiment`'s population scoring (P = 16, 64) and greedy generation."""
    _check(config)
    topo = topology(config.topology)
    factory = _factory(config.model)
    p, up = config.protocol, config.upstream
    length = p.max_length

    def reports():  # one by one, each printed as soon as it is compiled
        for size in POPULATIONS:
            yield compile_population(factory, topo, population=size,
                                     num_modules=p.modules_per_run, rank=up.rank, alpha=up.alpha,
                                     targets=up.targets, num_examples=p.k, input_len=length,
                                     target_len=min(length, 64))
        yield compile_generation(factory, topo, batch_size=p.generation_batch_size,
                                 input_len=length, max_new_tokens=p.max_new_tokens)

    return report(reports())
