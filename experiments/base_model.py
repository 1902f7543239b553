"""The base model of every experiment command, by one `--model.path` convention.

`--model.path` is a llama2.c checkpoint file (its `tokenizer.bin` beside it), a llama2.c folder
(holding `checkpoint_v1.bin` and `tokenizer.bin`), a Hugging Face model folder, or a hub id; a
relative path that does not exist as given is looked up in the data folder
(`slim_jax.settings.locate`), as `python -m slim_jax.generate --model` does. Loading is the
library's `slim_jax.models.loading.load_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from experiments.cli import flag
from experiments.presets.common import ModelSpec
from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.hub import resolve_model_dir
from slim_jax.models import loading
from slim_jax.models.hf import read_config
from slim_jax.models.registry import config_from_hf
from slim_jax.paths import as_path
from slim_jax.settings import locate
from slim_jax.tokenizer import Tokenizer

LLAMA2C_CHECKPOINT = "checkpoint_v1.bin"


def model_location(path: str, data_dir: str | None) -> str:
    """Where `--model.path` points: a file, a folder, or a hub id (see the module docstring).

    Raises:
      CheckpointError: a path that looks local (absolute, `.`, `~`, or with a file suffix) but
        exists neither as given nor in the data folder.

    >>> model_location("org/some-model", None)
    'org/some-model'
    """
    found = as_path(locate(path, data_dir))  # epath: a gs:// URL stays whole
    if found.is_dir() and not (found / "config.json").is_file() and (
            found / LLAMA2C_CHECKPOINT).is_file():
        return str(found / LLAMA2C_CHECKPOINT)
    if not found.exists() and (path.startswith(("/", ".", "~")) or Path(path).suffix):
        raise CheckpointError(f"--model.path {path} does not exist (nor in the data folder): "
                              "give a llama2.c checkpoint file or folder, a Hugging Face model "
                              "folder, or a hub id")
    return str(found) if found.exists() else path


def model_overrides(spec: ModelSpec, data_dir: str | None) -> dict[str, object]:
    """`--model.remat` / `--model.scan-layers` for the base model's config, checked against its
    family's config (from its `config.json`) before any long work: a setting the family lacks
    is one line naming its flag (a llama2.c file refuses them all when loaded, in one line too).

    Raises:
      ConfigError: a setting the family's config has no field for.
    """
    overrides = spec.config_overrides()
    where = model_location(spec.path, data_dir)
    if not overrides or Path(where).is_file():
        return overrides
    family_config = config_from_hf(read_config(resolve_model_dir(where)), source=where)
    try:
        return spec.config_overrides({f.name for f in dataclasses.fields(family_config)})
    except ConfigError as err:
        raise ConfigError(err.named(lambda name: flag(f"model.{name}"))) from None


def load_base(path: str, data_dir: str | None, *, dtype: str, param_dtype: str,
              **config_overrides: object) -> tuple[nnx.Module, Tokenizer, str]:
    """The base model, its tokenizer, and where it was found (what an adapter records as its
    base model); `config_overrides` as `loading.load_model` (`ModelSpec.config_overrides`)."""
    where = model_location(path, data_dir)
    model, tokenizer = loading.load_model(where, dtype=dtype, param_dtype=param_dtype,
                                          **config_overrides)
    return model, tokenizer, where


def max_positions(model: nnx.Module) -> int | None:
    """The longest sequence the model was built for, when its config says so."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None
