"""What every run of `python -m experiments.slim_finetune` shares: the config checked before any
work, the data and model located, the task and the general-capability measure built, the base
model loaded once per process and measured once per run folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from experiments.base_model import load_base, max_positions, model_location
from experiments.cli import flag
from experiments.presets.slim import SlimExperiment, TaskSpec
from experiments.run_state import read_json, write_atomic, write_json
from experiments.slim_methods import check_methods
from slim_jax.data import CausalLayout, tokenize_examples
from slim_jax.errors import ConfigError, DataError
from slim_jax.eval import (
    BenchmarkCapability,
    DownstreamResult,
    DownstreamTask,
    GeneralCapability,
    StoryCapability,
    commonsense_task,
    downstream_accuracy,
    forgetting_by_measure,
    gsm8k_task,
    mmlu_task,
    t0_classification_task,
)
from slim_jax.nn import inference_view
from slim_jax.parallel import make_mesh, shard_module
from slim_jax.settings import DATA_DIR_ENV
from slim_jax.settings import data_dir as resolve_data_dir
from slim_jax.tokenizer import Tokenizer
from slim_jax.train import Periodic
from slim_jax.train.workers import active

BASE_RECORD = "base/base.json"
STORIES = "stories.json"


def check_config(config: SlimExperiment) -> None:
    """Every value that needs no model or data checked, before any work; errors name the flag.

    Raises:
      ConfigError: the first value out of range.
    """
    check_methods(config.methods)
    if not config.seeds:
        raise ConfigError("no seed given: pass --seeds, e.g. --seeds 0,1,2")
    positive = {"data.batch_size": config.data.batch_size, "data.seq_len": config.data.seq_len,
                "eval.batch_size": config.eval.batch_size,
                "eval.max_length": config.eval.max_length,
                "eval.max_new_tokens": config.eval.max_new_tokens,
                "eval.benchmark_max_new_tokens": config.eval.benchmark_max_new_tokens,
                "general.num_stories": config.general.num_stories,
                "general.story_tokens": config.general.story_tokens,
                "workers": config.workers, "train.steps": config.train.steps,
                "train.log_every": config.train.log_every}
    for path, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag(path)} must be >= 1, got {value}")
    if config.eval.max_new_tokens >= config.eval.max_length:
        raise ConfigError(f"--eval.max-new-tokens ({config.eval.max_new_tokens}) must be below "
                          f"--eval.max-length ({config.eval.max_length}), which holds prompt "
                          "and answer")
    if config.data.epochs < 0 or config.train.save_every < 0 or config.num_devices < 0:
        raise ConfigError("--data.epochs, --train.save-every and --num-devices must be >= 0")
    if config.eval.curve_every < 0:
        raise ConfigError(f"--eval.curve-every must be >= 0 (0: no curve), got "
                          f"{config.eval.curve_every}")
    if config.eval.curve_examples is not None and config.eval.curve_examples < 1:
        raise ConfigError(f"--eval.curve-examples must be >= 1 (or none for all), got "
                          f"{config.eval.curve_examples}")
    if not 0.0 < config.task.test_fraction < 1.0:
        raise ConfigError(f"--task.test-fraction must be in (0, 1), got "
                          f"{config.task.test_fraction}")
    if config.workers > 1 and jax.process_count() > 1:
        raise ConfigError("--workers must be 1 in a multi-process job")
    check_validation(config.task)


def check_positions(config: SlimExperiment, model: nnx.Module) -> None:
    """Raise ConfigError when a row is longer than the model's positions (naming the flag)."""
    limit = max_positions(model)
    for path, value in (("data.seq_len", config.data.seq_len),
                        ("eval.max_length", config.eval.max_length)):
        if limit is not None and value > limit:
            raise ConfigError(f"{flag(path)} {value} exceeds the model's {limit} positions; "
                              f"pass {flag(path)} {limit} or less")


def check_validation(spec: TaskSpec) -> None:
    """Raise ConfigError if `task.validation` is set for a task kind without item splits."""
    if spec.validation and spec.kind != "t0":
        raise ConfigError(f"--task.validation is for t0 tasks (split by item); --task.kind "
                          f"{spec.kind} has its own test set: drop --task.validation")


def _benchmarks(config: SlimExperiment) -> tuple[str, ...]:
    return config.general.benchmarks if config.general.kind == "benchmarks" else ()


def resolve_inputs(config: SlimExperiment) -> Path | None:
    """Check, before any work, that the data folder and the model exist; return the folder.

    Raises:
      DataError: no data folder where one is needed, an unknown T0 template (named, with the
        known ones), missing GSM8K files.
      CheckpointError: `--model.path` that does not exist.
    """
    try:
        folder = resolve_data_dir(config.data_dir)
    except DataError:
        if config.task.kind in ("t0", "gsm8k"):
            raise
        folder = None
    if folder is not None and config.task.kind == "t0":
        known = sorted(p.stem for p in (folder / "t0_templates").glob("*.jsonl"))
        if not known:
            raise DataError(f"data folder {folder} has no t0_templates/*.jsonl: point --data-dir "
                            f"or ${DATA_DIR_ENV} at a folder laid out like shared/data")
        unknown = [n for n in config.task.names if n not in known]
        if unknown:
            close = [k for k in known if k.startswith(unknown[0].split("_")[0])][:6]
            raise DataError(f"--task.names: unknown T0 template {unknown[0]!r}; known ones "
                            f"include {', '.join(close or known[:6])} ({len(known)} in "
                            f"{folder / 't0_templates'})")
    if folder is not None and (config.task.kind == "gsm8k" or "gsm8k" in _benchmarks(config)):
        missing = [n for n in ("gsm8k/train.jsonl", "gsm8k/test.jsonl")
                   if not (folder / n).is_file()]
        if missing:
            raise DataError(f"data folder {folder} lacks {', '.join(missing)}: point --data-dir "
                            f"or ${DATA_DIR_ENV} at a folder laid out like shared/data")
    model_location(config.model.path, None if folder is None else str(folder))
    return folder


def build_task(config: SlimExperiment, folder: Path | None) -> DownstreamTask:
    """The downstream task of `config.task`."""
    spec = config.task
    caps = {"max_train": spec.max_train, "max_test": spec.max_test, "seed": spec.split_seed}
    if spec.kind == "t0":
        return t0_classification_task(spec.names, folder, test_fraction=spec.test_fraction,
                                      max_passage_words=spec.max_passage_words,
                                      validation=spec.validation, **caps)
    if spec.kind == "commonsense":
        return commonsense_task(spec.names, folder, **caps)
    return gsm8k_task(folder, **caps)


def build_capability(config: SlimExperiment, base: nnx.Module, tokenizer: Tokenizer,
                     folder: Path | None, stories: list[list[int]] | None) -> GeneralCapability:
    """The general-capability measure of `config.general`, built on the base model (from the
    stories already sampled, when given)."""
    spec, ev = config.general, config.eval
    if spec.kind == "stories":
        if stories is not None:
            return StoryCapability(base, tokenizer, stories)
        return StoryCapability.sample(base, tokenizer, num_stories=spec.num_stories,
                                      max_new_tokens=spec.story_tokens, seed=spec.story_seed,
                                      temperature=spec.story_temperature)
    if not spec.benchmarks:
        raise ConfigError("--general.kind benchmarks needs --general.benchmarks, e.g. "
                          "--general.benchmarks mmlu,gsm8k,piqa")
    tasks = []
    for name in spec.benchmarks:
        if name == "mmlu":
            tasks.append(mmlu_task(max_test=spec.max_examples, seed=config.task.split_seed))
        elif name == "gsm8k":
            tasks.append(gsm8k_task(folder, max_train=1, max_test=spec.max_examples))
        else:
            tasks.append(commonsense_task([name], folder, max_test=spec.max_examples,
                                          with_train=False))
    return BenchmarkCapability(tokenizer, tasks, mode=ev.mode, max_new_tokens=ev.max_new_tokens,
                               number_max_new_tokens=ev.benchmark_max_new_tokens,
                               max_length=ev.max_length, batch_size=ev.batch_size)


def evaluate_downstream(config: SlimExperiment, tokenizer: Tokenizer, task: DownstreamTask,
                        model: nnx.Module) -> tuple[DownstreamResult, float | None]:
    """Downstream accuracy of `model` (in inference mode) as `config.eval` says, and the
    accuracy by likelihood when it is asked for as well (None otherwise)."""
    ev = config.eval
    result = downstream_accuracy(model, tokenizer, task, mode=ev.mode,
                                 max_new_tokens=ev.max_new_tokens, max_length=ev.max_length,
                                 batch_size=ev.batch_size, length_normalized=ev.length_normalized)
    if not (ev.also_likelihood and ev.mode == "generate" and task.kind != "number"):
        return result, None
    ranked = downstream_accuracy(model, tokenizer, task, mode="likelihood",
                                 max_length=ev.max_length, batch_size=ev.batch_size,
                                 length_normalized=ev.length_normalized)
    return result, ranked.accuracy


def write_predictions(path: Path, task: DownstreamTask, result: DownstreamResult) -> None:
    """One JSON line per test example: reference, prediction, correct, output."""
    write_atomic(path, "".join(
        json.dumps({"answer": example.answer, "predicted": result.predictions[i],
                    "correct": result.correct[i], "output": result.outputs[i]}) + "\n"
        for i, example in enumerate(task.test)))


@dataclasses.dataclass
class Context:
    """What every run of one process shares: config, folders, the base model (loaded once; each
    run trains a copy), task, tokenised training data, the general measure, the base record."""

    config: SlimExperiment
    folder: Path | None
    out: Path
    base_model: nnx.Module
    base_path: str
    tokenizer: Tokenizer
    task: DownstreamTask
    layout: CausalLayout
    train_data: list[Any]
    capability: GeneralCapability
    base: dict[str, Any]
    devices: list[jax.Device]

    @property
    def leader(self) -> bool:
        """Process 0 writes the run folder's files (checkpoints are written by all)."""
        return jax.process_index() == 0


def load_checked(config: SlimExperiment, folder: Path | None
                 ) -> tuple[nnx.Module, Tokenizer, str]:
    """The base model, its tokenizer and where it was found, after checking the row lengths
    against its positions (`check_positions`)."""
    base_model, tokenizer, where = load_base(
        config.model.path, None if folder is None else str(folder), dtype=config.model.dtype,
        param_dtype=config.model.param_dtype, **config.model.config_overrides())
    check_positions(config, base_model)
    return base_model, tokenizer, where


def prepare(config: SlimExperiment, folder: Path | None, out: Path,
            loaded: tuple[nnx.Module, Tokenizer, str] | None = None) -> Context:
    """Everything the runs share (the base model as `load_checked` gives it, unless `loaded`).
    The base model is measured once per run folder: its record and stories are saved there,
    and later processes (workers, a resumed run) read them back, so every run is measured
    against the very same reference."""
    devices = jax.devices()[:config.num_devices] if config.num_devices else jax.devices()
    base_model, tokenizer, where = loaded or load_checked(config, folder)
    shard_module(base_model, make_mesh(config.train.mesh, devices), config.train.rules)
    base = inference_view(base_model)
    task = build_task(config, folder)
    layout = CausalLayout(tokenizer, lengths=(config.data.seq_len,))
    train_data = tokenize_examples(task.train, layout, task.template)
    saved_stories = read_json(out / STORIES)
    stop = active()
    with stop.interruptible() if stop else contextlib.nullcontext():
        capability = build_capability(config, base, tokenizer, folder,
                                      saved_stories and saved_stories["stories"])
        record = read_json(out / BASE_RECORD)
        ctx = Context(config, folder, out, base_model, where, tokenizer, task, layout,
                      train_data, capability, record or {}, devices)
        if record is None:
            downstream, by_likelihood = evaluate_downstream(config, tokenizer, task, base)
            general = capability.measure(base)
            ctx.base = {"downstream": downstream.accuracy,
                        "downstream_likelihood": by_likelihood, "general": general,
                        "general_score": general[capability.headline],
                        "majority": task.majority_accuracy()}
            if ctx.leader:
                stories = getattr(capability, "stories", None)
                if stories is not None and saved_stories is None:
                    write_json(out / STORIES, {"stories": stories, "texts": [
                        tokenizer.decode(s) for s in stories]})
                write_predictions(out / "base" / "predictions.jsonl", task, downstream)
                write_json(out / BASE_RECORD, ctx.base)
    return ctx



@dataclasses.dataclass
class CurvePoint:
    """One point of a run's accuracy-forgetting curve: downstream accuracy on the first
    `--eval.curve-examples` evaluation examples, and the general measure and its drop from the
    base model, of the model of a training step (`slim_jax.train.Periodic`'s function)."""

    ctx: Context

    def __call__(self, model: nnx.Module, step: int) -> dict[str, float]:
        ctx, ev = self.ctx, self.ctx.config.eval
        task, n = ctx.task, ev.curve_examples
        if n is not None and n < len(task.test):
            task = dataclasses.replace(task, test=task.test[:n], choices=task.choices[:n])
        # The same calls in the same order as a run's final evaluation: SLIM's dynamic merging
        # draws its masks from the model's RNG stream call by call, so a point on all examples
        # equals the final evaluation of that step.
        view = inference_view(model)
        downstream, by_likelihood = evaluate_downstream(ctx.config, ctx.tokenizer, task, view)
        general = ctx.capability.measure(view)
        headline = ctx.capability.headline
        drops = forgetting_by_measure(ctx.capability, ctx.base["general"], general)
        point = {"downstream": downstream.accuracy, "general_score": general[headline],
                 "forgetting": drops[headline], "examples": len(task.test)}
        if by_likelihood is not None:
            point["downstream_likelihood"] = by_likelihood
        return point


def curve_evaluation(ctx: Context) -> Periodic | None:
    """The trainer's evaluation along training when `--eval.curve-every` asks for one."""
    every = ctx.config.eval.curve_every
    return Periodic(CurvePoint(ctx), every=every) if every > 0 else None
