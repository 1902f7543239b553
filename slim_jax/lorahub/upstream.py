"""Upstream LoRA modules: train one LoRA per T0 template task with the shared trainer, save PEFT.

LoRAHub composes modules trained on FLAN tasks (`lorahub/flan_t5_large-<task>`). The data folder's
`t0_templates/` holds prompted tasks of which many carry exactly those `<task>` names, so modules
of the same names can be trained locally, for any base model (`upstream_task_names` lists them in
the reference's file order, which fixes the draws).

`train_module` fits a fresh LoRA adapter (PEFT's initialisation: A Kaiming-uniform, B zero) on one
task's (prompt, completion) pairs with `slim_jax.train.Trainer` (cross-entropy on the completion
and its EOS) and returns it as a `LoRAModule`; `save_module` writes it as a PEFT adapter directory.
`train_task_module` can keep `heldout` examples of the task out of training (`heldout_split`), on
which `module_accuracy` says whether the module learned its own task (greedy exact match).

Interruptions: a module whose training a stop signal ended early (SIGTERM, SIGINT, SLURM's
SIGUSR1) is never returned: `train_module` raises `TrainingInterrupted` (one line, naming the
module and its checkpoint), so a caller cannot record it as finished. With `checkpoint_dir` the
interrupted module's state is saved there and the next `train_module` call with the same folder
continues from it. `save_module` writes into a temporary folder renamed into place when complete,
so a module folder that exists is always whole.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.core.lora import init_lora_a, init_lora_b
from slim_jax.data import (
    BatchIterator,
    Example,
    exact_match_score,
    load_t0_template,
    tokenize_examples,
)
from slim_jax.data.layout import Layout
from slim_jax.data.sets import DataDir
from slim_jax.errors import ConfigError, DataError
from slim_jax.eval.tasks import subsample_indices
from slim_jax.lorahub.library import LibraryError, LoRAModule, ModuleLibrary, module_from_model
from slim_jax.lorahub.predict import greedy_answers
from slim_jax.nn import LoRAConfig, LoRALinear, adapted_layers, inject
from slim_jax.nn.stack import has_stacks, per_layer
from slim_jax.settings import data_dir as resolve_data_dir
from slim_jax.tokenizer import Tokenizer
from slim_jax.train import TrainConfig, Trainer

MODULE_NAMES_FILE = "lorahub_module_names.txt"
MODULE_PREFIX = "lorahub/flan_t5_large-"


def read_module_ids(path: str | os.PathLike[str] | None = None, data_dir: DataDir = None
                    ) -> list[str]:
    """The published LoRAHub module ids in the reference's order (one per line).

    Args:
      path: the id file; default `<data_dir>/lorahub_module_names.txt`.
      data_dir: the data folder (default `slim_jax.settings.data_dir()`).
    """
    if path is None:
        path = resolve_data_dir(data_dir, required=MODULE_NAMES_FILE) / MODULE_NAMES_FILE
    path = Path(path)
    if not path.is_file():
        raise DataError(f"module id file {path} does not exist (one LoRAHub module id a line)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"module id file {path} holds no ids")
    return ids


def task_of(module_id: str) -> str:
    """The task name of a module id: `lorahub/flan_t5_large-wiqa` -> `wiqa`.

    >>> task_of("lorahub/flan_t5_large-quoref_What_Is_The_Answer")
    'quoref_What_Is_The_Answer'
    """
    return module_id.rsplit("/", 1)[-1].removeprefix("flan_t5_large-")


def upstream_task_names(data_dir: DataDir = None, module_ids: Sequence[str] | None = None
                        ) -> list[str]:
    """Tasks of the LoRAHub module ids (file order) that have a non-empty T0 template file."""
    root = resolve_data_dir(data_dir, required="t0_templates") / "t0_templates"
    ids = read_module_ids(data_dir=data_dir) if module_ids is None else module_ids
    names = [task_of(i) for i in ids]
    return [n for n in names if (root / f"{n}.jsonl").is_file()
            and (root / f"{n}.jsonl").stat().length > 0]


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """How each upstream module is trained.

    Attributes:
      lora: rank, alpha (LoRAHub's r=16, alpha=32), dropout of every module.
      targets: regex over layer paths of the adapted linears (T5: `(q|v)$`; Llama: `(q|v)_proj$`).
      train: the trainer's settings (steps, optimiser, mesh, ...).
      batch_size: global batch rows.
      pack: pack several examples per row (decoder-only layouts).
      max_examples: use at most this many examples of a task (None: all).
      heldout: examples of each task kept out of training to score the module on its own task
        (`heldout_split`: none from a task of fewer than 5x as many; 0: train on all).
    """

    lora: LoRAConfig = dataclasses.field(
        default_factory=lambda: LoRAConfig(rank=16, alpha=32.0))
    targets: str = r"(q|v)_proj$"
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=100, progress=False, save_every=0))
    batch_size: int = 8
    pack: bool = True
    max_examples: int | None = None
    heldout: int = 0

    def __post_init__(self) -> None:
        if self.heldout < 0:
            raise ConfigError(f"must be >= 0, got {self.heldout}", field="heldout")
        if self.batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.batch_size}", field="batch_size")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"must be >= 1 or None (all), got {self.max_examples}",
                              field="max_examples")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ConfigError(f"{self.targets!r} is not a regular expression: {err}",
                              field="targets") from err


def prepare_model(model: nnx.Module, config: UpstreamConfig) -> list[str]:
    """Put LoRA layers of `config.lora` on the target layers of `model` (in place), once.

    Returns the adapted paths. Layers already adapted with the same rank and scale are kept.

    Raises:
      LibraryError: existing adapters of another kind, rank or scale.
    """
    layers = adapted_layers(model)
    if not layers:
        return inject(model, config.targets, config.lora, rngs=nnx.Rngs(0))
    for path, layer in layers.items():
        if (not isinstance(layer, LoRALinear)
                or (layer.config.rank, layer.config.scale) != (config.lora.rank,
                                                               config.lora.scale)):
            raise LibraryError(f"layer {path} already holds an adapter that is not a LoRA of "
                               f"rank {config.lora.rank} and scale {config.lora.scale}")
    return list(layers)


def reset_adapters(model: nnx.Module, seed: int) -> None:
    """Re-initialise every LoRA layer: A as its config says (from `seed`), B zero."""
    key = jax.random.key(seed)
    for layer in adapted_layers(model).values():
        key, sub = jax.random.split(key)
        cfg = layer.config
        layer.lora_a.set_value(init_lora_a(sub, layer.lora_a.shape, cfg.init_a,
                                           layer.lora_a.dtype))
        layer.lora_b.set_value(init_lora_b(layer.lora_b.shape, layer.lora_b.dtype))


def train_module(
    model: nnx.Module,
    layout: Layout,
    examples: Sequence[Example],
    name: str,
    config: UpstreamConfig = UpstreamConfig(),
    *,
    seed: int = 0,
    devices: Sequence[jax.Device] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> tuple[LoRAModule, list[dict[str, float]]]:
    """Train a fresh LoRA module on `examples`: `(module, the trainer's per-step records)`.

    The model gets LoRA layers on `config.targets` (in place, once: `prepare_model`), re-
    initialised from `seed`; `Trainer` trains them on its own copy of the state, and the trained
    factors come back as a `LoRAModule` named `name`. The model's LoRA layers are then reset
    (zero B), so it computes the base function again.

    Args:
      checkpoint_dir: where this module's checkpoints go (every `config.train.save_every`
        steps and on a stop signal); a checkpoint already there is resumed (state and data
        position), so the records then start after it (and are empty when the checkpoint
        already held the finished module). None: no checkpoints (an interrupted module starts
        again from step 0). Delete the folder once the module is saved.

    Raises:
      ConfigError / DataError: bad settings, no examples, fewer examples than one batch.
      TrainingInterrupted: a stop signal ended the training before `config.train.steps`; the
        module is not returned (its state is in `checkpoint_dir`, when given).
    """
    if not examples:
        raise DataError(f"task {name!r} has no examples to train on")
    if config.max_examples is not None:
        examples = examples[:config.max_examples]
    prepare_model(model, config)
    data = tokenize_examples(examples, layout)
    batches = BatchIterator(data, layout, global_batch_size=config.batch_size, seed=seed,
                            pack=config.pack)
    reset_adapters(model, seed)  # every module starts from its own seed's initialisation
    trainer = Trainer(model, config.train, devices=devices)
    ckpt = None if checkpoint_dir is None else Checkpointer(checkpoint_dir, keep=1,
                                                               async_save=False)
    try:
        result = trainer.fit(batches, checkpointer=ckpt)
    finally:
        reset_adapters(model, seed)
        if ckpt is not None:
            ckpt.close()
    result.check_completed(f"module {name!r}")
    return module_from_model(trainer.model(), name), result.history


def heldout_split(examples: Sequence[Example], heldout: int, seed: int = 0
                  ) -> tuple[list[Example], list[Example]]:
    """`(train, heldout)`: `heldout` examples drawn with `random.Random(seed)`
    (`subsample_indices`) and the others, each part in its original order. A task of fewer than
    `5 * heldout` examples keeps them all for training (some T0 files hold 8: every one counts).

    >>> train, held = heldout_split([Example(str(i), "x") for i in range(10)], 2)
    >>> [e.instruction for e in train], [e.instruction for e in held]
    (['0', '1', '2', '3', '4', '5', '7', '8'], ['6', '9'])
    >>> [len(part) for part in heldout_split([Example(str(i), "x") for i in range(8)], 2)]
    [8, 0]
    """
    if heldout <= 0 or len(examples) < 5 * heldout:
        return list(examples), []
    chosen = set(subsample_indices(len(examples), heldout, seed))
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def train_task_module(
    model: nnx.Module,
    layout: Layout,
    task: str,
    config: UpstreamConfig = UpstreamConfig(),
    *,
    data_dir: DataDir = None,
    seed: int = 0,
    devices: Sequence[jax.Device] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> tuple[LoRAModule, list[dict[str, float]]]:
    """`train_module` on the T0 template task `task` of the data folder, without its
    `config.heldout` held-out examples (`heldout_split`, seed 0: the same for every module)."""
    train, _ = heldout_split(load_t0_template(task, data_dir), config.heldout)
    return train_module(model, layout, train, task, config, seed=seed, devices=devices,
                        checkpoint_dir=checkpoint_dir)


def module_accuracy(model: nnx.Module, tokenizer: Tokenizer, module: LoRAModule,
                    examples: Sequence[Example], *, max_new_tokens: int = 32,
                    batch_size: int = 64) -> float:
    """Exact match x 100 (`slim_jax.data.exact_match_score`) of the greedy answers of `model`
    with `module` merged in, to the examples' instructions, against their answers.

    `model` is left as it was (plain, or carrying zero-B LoRA layers of the module's rank).
    """
    if not examples:
        raise DataError(f"no examples to score module {module.name!r} on")
    merged = ModuleLibrary.from_modules([module]).attach(model).merged_model(
        jax.numpy.ones(1, jax.numpy.float32))
    answers = greedy_answers(merged, tokenizer, [e.instruction for e in examples],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    return exact_match_score(answers, [e.answer or e.response for e in examples])


def save_module(model: nnx.Module, module: LoRAModule, directory: str | os.PathLike[str], *,
                base_model_name_or_path: str) -> Path:
    """Write `module` as a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`) for `model`'s architecture; returns the directory.

    `model` must carry LoRA layers exactly on the module's layers (`prepare_model`); they hold
    the module's factors while it is written and get their own back afterwards. The files are
    written into `<directory>.partial` and renamed to `directory` once complete (an existing
    `directory` is replaced), so a kill in the middle never leaves a folder that looks whole.
    """
    if has_stacks(model):  # a scanned model: its layers one by one, stacked again after
        with per_layer(model, frozen_abstract=True):  # the base is not copied
            return save_module(model, module, directory,
                               base_model_name_or_path=base_model_name_or_path)
    from slim_jax.models.peft_io import save_peft

    layers = adapted_layers(model)
    if sorted(layers) != list(module.paths):
        raise LibraryError(f"module {module.name!r} adapts {list(module.paths)[:3]}..., the "
                           f"model's LoRA layers are {sorted(layers)[:3]}...: not the same layers")
    saved = {path: (layer.lora_a.get_value(), layer.lora_b.get_value())
             for path, layer in layers.items()}
    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier kill
    try:
        for path, layer in layers.items():
            a, b = module.factors[path]
            layer.lora_a.set_value(jax.numpy.asarray(a, layer.lora_a.dtype))
            layer.lora_b.set_value(jax.numpy.asarray(b, layer.lora_b.dtype))
        save_peft(model, partial, base_model_name_or_path=base_model_name_or_path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        for path, layer in layers.items():
            layer.lora_a.set_value(saved[path][0])
            layer.lora_b.set_value(saved[path][1])
    return final
