"""Load a model and its tokenizer from whatever a user points at: a Hugging Face directory or hub
id (any registered family: Llama family, T5), or a llama2.c checkpoint file.

`load_model` picks the family from the directory's `config.json` (`model_type`, looked up in
`slim_jax.models.registry`), or reads a file as a llama2.c checkpoint (its `tokenizer.bin` beside
it unless another is named). Every family generates with `slim_jax.models.generate.generate`;
attach adapters with `slim_jax.models.adapter_io`.

>>> import tempfile
>>> from slim_jax.errors import ConfigError
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "config.json").write_text('{"model_type": "gpt2"}')
>>> try:
...     load_model(folder)
... except ConfigError as err:
...     print(str(err).split(": ", 1)[1][:58])
model_type 'gpt2' is not implemented; slim_jax loads llama
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from etils import epath

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.hub import resolve_model_dir
from slim_jax.models.family import ModelFamily
from slim_jax.models.hf import read_config
from slim_jax.models.llama import Llama
from slim_jax.models.llama2c import load_llama2c
from slim_jax.models.registry import family_of
from slim_jax.paths import as_path, is_remote, local_copy, probe
from slim_jax.tokenizer import HFTokenizer, Tokenizer

LLAMA2C_TOKENIZER = "tokenizer.bin"

PathLike = str | os.PathLike[str]

# First bytes of PyTorch checkpoints: a zip archive (torch.save since 1.6), or the legacy format's
# pickled magic number (protocol 2, LONG1 of 10 bytes); no llama2.c header starts this way.
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


def load_model(
    name_or_path: PathLike,
    *,
    tokenizer: PathLike | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    **config_overrides: Any,
) -> tuple[ModelFamily, Tokenizer]:
    """A model and its tokenizer from a Hugging Face directory or hub id, or a llama2.c file.

    Args:
      name_or_path: a model directory (`config.json` + safetensors, a `model_type` of
        `registry.model_types()`: llama, qwen2, t5, mt5, ...), a hub id (fetched, or read from
        the local cache when offline), or a llama2.c checkpoint file (`.bin`, version 1 or
        legacy export). Directories and files may be remote (`gs://bucket/model`): they are
        copied into the local cache first (`slim_jax.paths.local_copy`).
      tokenizer: the tokenizer to use instead of the model's: a Hugging Face tokenizer directory or
        hub id, or a llama2.c `tokenizer.bin` (default: the one beside the checkpoint); local or
        remote.
      dtype: compute dtype (`"float32"`, `"bfloat16"`, ...).
      param_dtype: storage dtype of the weights; None stores them in `dtype`.
      allow_pickle: accept `pytorch_model.bin` / `.pt` weights in a Hugging Face directory (a
        pickle can run code; off by default).
      config_overrides: fields of the family's config the checkpoint does not hold (e.g.
        `scan_layers=True`, `remat="full"`: a scanned Llama or T5 is loaded stacked directly).

    Returns:
      `(model, tokenizer)`: a model of the checkpoint's family, and a `Tokenizer`.

    Raises:
      CheckpointError: a path that does not exist and is not a hub id, a hub id that cannot be
        fetched (offline and not cached), missing files, a PyTorch pickle given as a file.
      ConfigError: an architecture slim_jax does not implement (naming the supported ones).
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    if is_remote(name_or_path) and probe(as_path(name_or_path), "is_file"):
        return _load_llama2c_file(as_path(name_or_path), tokenizer, dtype, param_dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if config_overrides:
            raise ConfigError(f"{path} is a llama2.c checkpoint, loaded with the default "
                              f"execution settings; {sorted(config_overrides)} apply to Hugging "
                              "Face model directories")
        return _load_llama2c_file(path, tokenizer, dtype, param_dtype)
    if path.is_dir() and not (path / "config.json").is_file():
        binaries = sorted(p.name for p in path.glob("*.bin"))
        if binaries and not (path / "pytorch_model.bin").exists():
            raise CheckpointError(f"{str(path)!r} holds no config.json, so it is not a Hugging "
                                  "Face model directory; for a llama2.c checkpoint pass the file "
                                  f"itself (e.g. {path / binaries[0]})")
    directory = resolve_model_dir(name_or_path)
    cls = family_of(read_config(directory).get("model_type"),
                    source=str(directory / "config.json"))
    model = cls.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype,
                                allow_pickle=allow_pickle, **config_overrides)
    return model, HFTokenizer(directory if tokenizer is None else tokenizer)


def _load_llama2c_file(path: Path | epath.Path, tokenizer: PathLike | None, dtype: Any,
                       param_dtype: Any) -> tuple[Llama, Tokenizer]:
    """A llama2.c checkpoint file (local or remote: remote files are read from the local cache,
    `slim_jax.paths.local_copy`) and its tokenizer."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(_TORCH_MAGICS):
        raise CheckpointError(f"{path} is a PyTorch pickle, not a llama2.c checkpoint: pass the "
                              "Hugging Face model directory that holds it (and allow pickles "
                              "only if you trust its source)")
    if tokenizer is None:
        tokenizer = path.with_name(LLAMA2C_TOKENIZER)
        if not probe(tokenizer, "is_file"):
            raise CheckpointError(f"no {LLAMA2C_TOKENIZER} beside the llama2.c checkpoint {path}: "
                                  "name its tokenizer file explicitly")
    return load_llama2c(local_copy(path), local_copy(tokenizer), dtype=dtype,
                        param_dtype=param_dtype)

