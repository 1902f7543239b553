"""`python -m experiments.train_lora_modules`: LoRAHub's upstream LoRA modules, trained locally.

One LoRA module per T0 template task of the data folder whose name is one of LoRAHub's published
modules (`lorahub/flan_t5_large-<task>`, taken in `lorahub_module_names.txt` order), trained with
the shared trainer (`slim_jax.train.Trainer`: cross-entropy on the completion and its EOS) and
saved as a PEFT adapter folder `<out>/<task>` (`adapter_config.json`,
`adapter_model.safetensors`) that `peft` and `slim_jax.lorahub.load_module` read; a module's folder
appears (by one rename) only when it is finished. `<out>/modules.json` records the finished tasks
in order with their first and last training losses and, with `--upstream.heldout N` (the cpu
preset: 20), each module's greedy exact match on N examples of its own task kept out of its
training, beside the share the most frequent training answer gets (`<out>/modules.md`: the same
as a table); `<out>/FINISHED` marks the whole set done.

Stop and resume: SIGTERM, SIGINT or SIGUSR1 saves the module in training as a checkpoint
(`<out>/.partial/<task>`, every `--upstream.save-every` steps as well) and exits with one line
naming what is saved and the command that resumes; the same command again keeps the finished
modules and continues the interrupted one from its checkpoint. An `--out` holding a finished set
is refused unless `--overwrite` (which deletes and retrains it).

The cpu preset trains 24 modules on the TinyStories model (r=16, alpha=32 on q_proj and v_proj;
150 steps of 4 packed rows of 256 tokens each, 20 examples of each task held out: about 30 s
per module on 2 cores, and 5-30 s to score it on its held-out examples).

The base model's execution settings `--model.remat` and `--model.scan-layers` (a Hugging Face
model folder whose family's config has them) apply as `lorahub_bbh`'s do; the saved modules are
the same PEFT folders either way.

Examples:
    python -m experiments.train_lora_modules                        # cpu preset, 24 modules
    python -m experiments.train_lora_modules --upstream.num-modules 40 --upstream.steps 60
    python -m experiments.train_lora_modules --preset flan-t5-large --out /ckpt/lorahub_modules
    python -m experiments.train_lora_modules --preset flan-t5-large --model.remat full
    python -m experiments.train_lora_modules --help                 # every field and default
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from experiments import run_state
from experiments.base_model import load_base, max_positions, model_overrides
from experiments.cli import parse_config, run_command
from experiments.presets.lorahub import PRESETS, UpstreamExperiment, UpstreamSpec
from experiments.run_folder import resolve_out
from slim_jax.checkpoint import Checkpointer
from slim_jax.data import CausalLayout, EncoderDecoderLayout, load_t0_template
from slim_jax.data.layout import Layout
from slim_jax.errors import DataError
from slim_jax.lorahub.library import LoRAModule
from slim_jax.lorahub.upstream import (
    heldout_split,
    module_accuracy,
    prepare_model,
    save_module,
    train_task_module,
    upstream_task_names,
)
from slim_jax.settings import enable_compilation_cache
from slim_jax.tokenizer import Tokenizer
from slim_jax.train import TrainingInterrupted, read_metrics
from slim_jax.train.workers import StopSignals, active

PROG = "python -m experiments.train_lora_modules"
MANIFEST = "modules.json"
PARTIAL = ".partial"


def parse_cli(argv: Sequence[str] | None = None) -> UpstreamExperiment:
    """The config from the command line: `--preset` first, then field overrides."""
    return parse_config(PROG, __doc__, {name: pair[1] for name, pair in PRESETS.items()}, argv)


def training_layout(model: nnx.Module, tokenizer: Tokenizer, max_length: int) -> Layout:
    """One fixed row shape (one compiled step): `max_length` tokens per row (capped at the
    model's positions), or per encoder and decoder row for T5."""
    if model.layout == "encoder_decoder":  # slim_jax.models.family.ModelFamily
        return EncoderDecoderLayout(tokenizer, enc_lengths=(max_length,),
                                    dec_lengths=(max_length,))
    limit = min(max_length, max_positions(model) or max_length)
    return CausalLayout(tokenizer, lengths=(limit,))


def chosen_tasks(spec: UpstreamSpec, data_dir: str | None) -> list[str]:
    """The tasks to train, in LoRAHub's module order.

    Raises:
      DataError: a named task without T0 template data (naming it and what is available).
    """
    available = upstream_task_names(data_dir)
    if spec.tasks:
        unknown = [t for t in spec.tasks if t not in available]
        if unknown:
            raise DataError(f"--upstream.tasks: {unknown[0]!r} is not a LoRAHub module task "
                            f"with T0 template data; known ones ({len(available)}): "
                            f"{', '.join(available[:8])}, ...")
        return list(spec.tasks)
    return available if spec.num_modules is None else available[:spec.num_modules]


def finished_set(out: Path) -> bool:
    """Whether `out` holds a finished set of modules."""
    return (out / run_state.FINISHED).is_file()


def train_modules(config: UpstreamExperiment, argv: Sequence[str] = ()) -> list[str] | None:
    """Train the modules `config` asks for into `config.out`, resuming an interrupted set there
    (`argv`, when given, is recorded in its command.txt). Returns None when all are finished, or
    what is saved when a stop signal stopped it.

    Raises:
      ConfigError: `out` is a file, unwritable, finished (without overwrite) or another set's.
      DataError: an unknown task.
    """
    stop = active() or StopSignals()
    out = resolve_out(config.out, "train_lora_modules", config.preset)
    tasks = chosen_tasks(config.upstream, config.data_dir)
    overrides = model_overrides(config.model, config.data_dir)
    # Checked, then the base loaded, before the folder is written: bad input leaves nothing.
    run_state.open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite,
                              create=False)
    enable_compilation_cache(config.compilation_cache)
    model, tokenizer, base_name = load_base(config.model.path, config.data_dir,
                                            dtype=config.model.dtype,
                                            param_dtype=config.model.param_dtype, **overrides)
    run_state.open_run_folder(out, dataclasses.asdict(config), overwrite=config.overwrite)
    if argv:
        run_state.write_atomic(out / "command.txt", shlex.join([*PROG.split(), *argv]) + "\n")
    spec = config.upstream
    upstream = spec.library_config(model.layout == "encoder_decoder")
    layout = training_layout(model, tokenizer, spec.max_length)
    devices = jax.devices()[:spec.num_devices] if spec.num_devices else None
    prepare_model(model, upstream)
    manifest: dict[str, Any] = dict((run_state.read_json(out / MANIFEST) or {}).get("losses", {}))
    todo = [t for t in tasks if not (out / t / "adapter_config.json").is_file()]
    if len(todo) < len(tasks):
        print(f"{PROG}: {len(tasks) - len(todo)} of {len(tasks)} modules already in {out}; "
              f"training {len(todo)}", flush=True)
    for task in tqdm(todo, desc="upstream modules", disable=not config.progress):
        partial = out / PARTIAL / task
        if stop.requested:
            break
        if (partial / "checkpoints").is_dir():
            print(f"[{task}] resuming from its checkpoint", flush=True)
        train = dataclasses.replace(upstream.train, run_dir=str(partial))
        try:
            module, _ = train_task_module(
                model, layout, task, dataclasses.replace(upstream, train=train),
                seed=spec.seed + tasks.index(task), data_dir=config.data_dir, devices=devices)
        except TrainingInterrupted:  # never recorded as finished; its checkpoint resumes it
            module = None
        if module is None or Checkpointer(partial / "checkpoints").latest_step() != spec.steps:
            stop.request(stop.requested or "SIGTERM")
            return [f"{len(tasks) - len(todo) + todo.index(task)} of {len(tasks)} modules "
                    f"finished in {out}", f"{task} at step "
                    f"{Checkpointer(partial / 'checkpoints').latest_step()} ({partial})"]
        save_module(model, module, partial / "module", base_model_name_or_path=base_name)
        (partial / "module").replace(out / task)  # the module appears whole, or not at all
        losses = {int(r["step"]): r["loss"] for r in read_metrics(partial / "metrics.jsonl")}
        manifest[task] = {"first_loss": losses[min(losses)], "last_loss": losses[max(losses)],
                          "steps": spec.steps,
                          **heldout_scores(model, tokenizer, module, task, spec, config.data_dir)}
        shutil.rmtree(partial)
        _write_manifest(out, tasks, manifest)
    if stop.requested and any(not (out / t).is_dir() for t in tasks):
        done = sum((out / t).is_dir() for t in tasks)
        return [f"{done} of {len(tasks)} modules finished in {out}"]
    _write_manifest(out, tasks, manifest)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    run_state.mark_finished(out)
    return None


def heldout_scores(model: nnx.Module, tokenizer: Tokenizer, module: LoRAModule, task: str,
                   spec: UpstreamSpec, data_dir: str | None) -> dict[str, Any]:
    """The module's greedy exact match on its task's held-out examples and the share of them
    the train part's most frequent answer matches (empty without held-out examples)."""
    train, held = heldout_split(load_t0_template(task, data_dir), spec.heldout)
    if not held:
        return {}
    top = Counter(e.answer for e in train).most_common(1)[0][0]
    return {"heldout": len(held),
            "heldout_accuracy": module_accuracy(model, tokenizer, module, held),
            "heldout_majority": 100.0 * sum(e.answer == top for e in held) / len(held)}


def modules_table(tasks: Sequence[str], manifest: dict[str, Any]) -> str:
    """modules.md: each finished module's losses and held-out accuracy on its own task.

    >>> print(modules_table(["t"], {"t": {"first_loss": 5.0, "last_loss": 0.5, "steps": 9,
    ...                                   "heldout": 20, "heldout_accuracy": 80.0,
    ...                                   "heldout_majority": 55.0}}))
    | module (T0 task) | steps | first loss | last loss | held-out | exact match | majority |
    |---|---|---|---|---|---|---|
    | t | 9 | 5.000 | 0.500 | 20 | 80.0 | 55.0 |
    """
    rows = ["| module (T0 task) | steps | first loss | last loss | held-out | exact match "
            "| majority |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        if task in manifest:
            m = manifest[task]
            held = (f"{m['heldout']} | {m['heldout_accuracy']:.1f} | {m['heldout_majority']:.1f}"
                    if "heldout" in m else "- | - | -")
            rows.append(f"| {task} | {m['steps']} | {m['first_loss']:.3f} | "
                        f"{m['last_loss']:.3f} | {held} |")
    return "\n".join(rows)


def _write_manifest(out: Path, tasks: list[str], losses: dict[str, Any]) -> None:
    present = [t for t in tasks if (out / t / "adapter_config.json").is_file()]
    run_state.write_json(out / MANIFEST, {"tasks": present, "losses": losses})
    run_state.write_atomic(out / "modules.md", modules_table(present, losses) + "\n")


def run(config: UpstreamExperiment, argv: list[str], stop: StopSignals) -> int:
    """Train the modules; 0 when all are finished, else print the stop line and return
    128 + the signal's number."""
    stopped = train_modules(config, argv)
    out = resolve_out(config.out, "train_lora_modules", config.preset)
    if stopped is not None:
        print(run_state.stop_message(PROG, stop.requested or "SIGTERM", stopped, argv, out),
              file=sys.stderr, flush=True)
        return stop.exit_code
    print(f"modules in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 when every module is trained, 2 on bad input (one line on stderr),
    128 + the signal's number when a stop signal stopped it (one line says how to resume)."""
    return run_command(PROG, argv, parse_cli, run)


if __name__ == "__main__":
    sys.exit(main())
