"""`python -m experiments.train_lora_modules`: LoRAHub's upstream LoRA modules, trained locally.

One LoRA module per T0 template task of the data folder whose name is one of LoRAHub's published
modules (`lorahub/flan_t5_large-<task>`, taken in `lorahub_module_names.txt` order), trained with
the shared trainer (`slim_jax.train.Trainer`: cross-entropy on the completion and its EOS) and
saved as a PEFT adapter folder `<out>/<task>` (`adapter_config.json`,
`adapter_model.safetensors`) that `peft` and `slim_jax.lorahub.load_module` read. Modules already
in `<out>` are kept (resume), unless `--overwrite true`. `<out>/modules.json` records the tasks in
order with their first and last training losses.

The cpu preset trains 24 modules on the TinyStories model (r=16, alpha=32 on q_proj and v_proj;
30 steps of 4 packed rows of 256 tokens each: about 10-20 s per module on 2 cores).

Examples:
    python -m experiments.train_lora_modules                        # cpu preset, 24 modules
    python -m experiments.train_lora_modules --upstream.num-modules 40 --upstream.steps 60
    python -m experiments.train_lora_modules --preset flan-t5-large --out /ckpt/lorahub_modules
    python -m experiments.train_lora_modules --help                 # every field and default
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx
from tqdm.auto import tqdm

from experiments.config_cli import parse_preset_cli
from experiments.presets.lorahub import PRESETS, ModelSpec, UpstreamExperiment, UpstreamSpec
from experiments.presets.lorahub import preset as get_preset
from slim_jax.data import CausalLayout, EncoderDecoderLayout
from slim_jax.data.layout import Layout
from slim_jax.errors import DataError, SlimJaxError
from slim_jax.lorahub.upstream import (
    UpstreamConfig,
    prepare_model,
    save_module,
    train_task_module,
    upstream_task_names,
)
from slim_jax.models import loading
from slim_jax.nn import LoRAConfig
from slim_jax.parallel import MeshConfig
from slim_jax.settings import enable_compilation_cache, locate
from slim_jax.tokenizer import Tokenizer
from slim_jax.train import OptimizerConfig, TrainConfig

PROG = "python -m experiments.train_lora_modules"
MANIFEST = "modules.json"


def parse_cli(argv: Sequence[str] | None = None) -> UpstreamExperiment:
    """The config from the command line: `--preset` first, then field overrides."""
    return parse_preset_cli(PROG, __doc__, PRESETS, lambda name: get_preset(name)[1], argv)


def load_model(spec: ModelSpec, data_dir: str | None) -> tuple[nnx.Module, Tokenizer, str]:
    """The base model, its tokenizer, and the name PEFT records as its base model.

    A relative `spec.path` that does not exist as given is looked up in the data folder.

    Raises:
      CheckpointError / ConfigError: from `slim_jax.models.loading.load_model` (missing files,
        an unsupported architecture), naming the path.
    """
    name = locate(spec.path, data_dir)  # else a hub id
    model, tokenizer = loading.load_model(name, dtype=spec.dtype, param_dtype=spec.param_dtype)
    return model, tokenizer, name


def training_layout(model: nnx.Module, tokenizer: Tokenizer, max_length: int) -> Layout:
    """One fixed row shape (one compiled step): `max_length` tokens per row (capped at the
    model's positions), or per encoder and decoder row for T5."""
    if model.layout == "encoder_decoder":  # slim_jax.models.family.ModelFamily
        return EncoderDecoderLayout(tokenizer, enc_lengths=(max_length,),
                                    dec_lengths=(max_length,))
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    return CausalLayout(tokenizer, lengths=(limit,))


def upstream_config(spec: UpstreamSpec, encoder_decoder: bool) -> UpstreamConfig:
    """The library's `UpstreamConfig` of the command line's settings."""
    train = TrainConfig(
        steps=spec.steps, progress=False, save_every=0, log_every=max(1, spec.steps // 10),
        async_checkpoint=False, mesh=MeshConfig(data=-1),
        optimizer=OptimizerConfig(learning_rate=spec.learning_rate,
                                  warmup_steps=spec.warmup_steps))
    return UpstreamConfig(
        lora=LoRAConfig(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout),
        targets=spec.targets, train=train, batch_size=spec.batch_size,
        pack=spec.pack and not encoder_decoder, max_examples=spec.max_examples)


def chosen_tasks(spec: UpstreamSpec, data_dir: str | None) -> list[str]:
    """The tasks to train, in LoRAHub's module order.

    Raises:
      DataError: a named task without T0 template data (listing what is available).
    """
    available = upstream_task_names(data_dir)
    if spec.tasks:
        unknown = [t for t in spec.tasks if t not in available]
        if unknown:
            raise DataError(f"tasks {unknown} are not LoRAHub module tasks with T0 template "
                            f"data; available ({len(available)}): {', '.join(available[:8])}, ...")
        return list(spec.tasks)
    return available if spec.num_modules is None else available[:spec.num_modules]


def train_modules(config: UpstreamExperiment, *, model: nnx.Module | None = None,
                  tokenizer: Tokenizer | None = None, base_name: str | None = None) -> Path:
    """Train the modules `config` asks for into `config.out` (keeping existing ones); returns
    the folder. A loaded base model may be passed (it gains LoRA layers in place)."""
    enable_compilation_cache(config.compilation_cache)
    tasks = chosen_tasks(config.upstream, config.data_dir)
    if model is None or tokenizer is None:
        model, tokenizer, base_name = load_model(config.model, config.data_dir)
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    spec = config.upstream
    upstream = upstream_config(spec, model.layout == "encoder_decoder")
    layout = training_layout(model, tokenizer, spec.max_length)
    devices = jax.devices()[:spec.num_devices] if spec.num_devices else None
    prepare_model(model, upstream)
    manifest = _read_manifest(out)
    bar = tqdm(tasks, desc="upstream modules", disable=not config.progress)
    for i, task in enumerate(bar):
        folder = out / task
        if (folder / "adapter_config.json").is_file() and not config.overwrite:
            continue
        bar.set_postfix_str(task[:40])
        module, history = train_task_module(model, layout, task, upstream, seed=spec.seed + i,
                                            data_dir=config.data_dir, devices=devices)
        save_module(model, module, folder, base_model_name_or_path=base_name or "")
        manifest[task] = {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                          "steps": len(history)}
        _write_manifest(out, tasks, manifest)
    _write_manifest(out, tasks, manifest)
    return out


def _read_manifest(out: Path) -> dict[str, dict[str, float]]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("losses", {}))


def _write_manifest(out: Path, tasks: list[str], losses: dict[str, dict[str, float]]) -> None:
    present = [t for t in tasks if (out / t / "adapter_config.json").is_file()]
    (out / MANIFEST).write_text(json.dumps({"tasks": present, "losses": losses}, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input prints one line to stderr and returns 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_cli(args)
        out = train_modules(config)
    except SlimJaxError as err:
        print(f"{PROG.split()[-1]}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    (out / "command.txt").write_text(shlex.join([*PROG.split(), *args]) + "\n")
    print(f"modules in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
