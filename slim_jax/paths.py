"""Paths that may be remote: local folders and `gs://` (`s3://`, `az://`, `hf://`) URLs alike.

One abstraction for the whole library: `etils.epath.Path` (a required dependency, also the one
orbax checkpoints use), which keeps a URL whole when joined (`gs://b/m` / `config.json` is
`gs://b/m/config.json`) where `pathlib.Path` would fold it into `gs:/b/m`. Without TensorFlow it
reads URLs through fsspec: `gs://` needs `gcsfs` (in the `tpu` extra), `s3://` needs `s3fs`.

Small files (configs, data sets) are read in place. Files a library must open by a local name
(safetensors, which `safe_open` memory-maps; tokenizer files; PEFT adapters) are copied first
into a local cache, `$SLIM_JAX_CACHE_DIR` (default `~/.cache/slim_jax`), one copy per host
shared by its processes: a Llama-3-8B in bf16 costs about 16 GB of local disk on every host,
fetched once (a file is fetched again only when its size changed).

A leaf module: imports nothing of slim_jax but errors.

>>> str(as_path("gs://bucket/llama") / "config.json")
'gs://bucket/llama/config.json'
>>> str(as_path("gs:/bucket/llama"))  # a URL pathlib already folded is restored
'gs://bucket/llama'
>>> is_remote("gs://bucket/llama"), is_remote("/data/llama"), is_remote("owner/name")
(True, False, False)
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import re
import shutil
from collections.abc import Sequence

from etils import epath

from slim_jax.errors import CheckpointError, DataError

CACHE_ENV = "SLIM_JAX_CACHE_DIR"
SCHEMES = ("gs", "s3", "az", "hf")
"""URL schemes `etils.epath` reads (through fsspec, or TensorFlow's gfile when installed)."""

PathLike = str | os.PathLike[str]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FOLDED = re.compile(rf"^({'|'.join(SCHEMES)}):/(?!/)")  # what pathlib makes of a URL
_CHUNK = 64 << 20


class RemotePathError(CheckpointError, DataError):
    """A URL that cannot be read: unknown scheme, missing file system package, no access, or
    nothing there (a `CheckpointError` for models, a `DataError` for data sets)."""


def is_remote(path: PathLike | epath.Path) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return bool(_URL.match(_text(path)))


def _text(path: PathLike | epath.Path) -> str:
    return _FOLDED.sub(r"\1://", os.fspath(path))


def as_path(path: PathLike | epath.Path) -> epath.Path:
    """`path` as an `epath.Path`: a URL kept whole, a local path with `~` expanded.

    Raises:
      RemotePathError: a URL of a scheme epath cannot read (naming the ones it can).
    """
    text = _text(path)
    match = _URL.match(text)
    if match is None:
        return epath.Path(text).expanduser()
    if match.group(1) not in SCHEMES:
        raise RemotePathError(f"{text!r}: URL scheme {match.group(1)}:// is not supported; use "
                              f"{', '.join(s + '://' for s in SCHEMES)} or a local path")
    return epath.Path(text)


def probe(path: epath.Path, what: str = "exists") -> bool:
    """`path.exists()` (or `is_dir`, `is_file`), with a remote failure as one line naming it.

    Raises:
      RemotePathError: the file system package is missing (`gcsfs` for `gs://`), or the URL
        cannot be reached or read (credentials, permissions, network).
    """
    try:
        return bool(getattr(path, what)())
    except ImportError as err:
        package = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}.get(
            str(path).split(":", 1)[0], "its fsspec file system")
        raise RemotePathError(f"reading {path} needs the package {package} (pip install "
                              f"{package}; the tpu extra installs gcsfs)") from err
    except (OSError, ValueError) as err:
        raise RemotePathError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def cache_dir() -> pathlib.Path:
    """The local folder remote files are copied into: `$SLIM_JAX_CACHE_DIR`, else
    `~/.cache/slim_jax`."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/slim_jax").expanduser()


def local_copy(path: PathLike | epath.Path, patterns: Sequence[str] | None = None
               ) -> pathlib.Path:
    """A local file or folder with the contents of `path`: `path` itself when it is local, else
    a copy under `cache_dir()` (`gs://b/m/x` -> `<cache>/gs/b/m/x`).

    Args:
      path: a local path or a URL of a file or a folder.
      patterns: for a folder, glob patterns of the files (relative paths, as in the hub's
        `allow_patterns`) to copy; None copies every file.

    Returns:
      The local path. Files already in the cache with the remote size are not fetched again;
      a fetched file is written beside its place and renamed into it, so processes of one host
      that copy at the same time never see a partial file.

    Raises:
      RemotePathError: the URL does not exist or cannot be read (one line naming it).

    >>> import tempfile
    >>> local_copy(tempfile.gettempdir()) == pathlib.Path(tempfile.gettempdir())
    True
    """
    if not is_remote(path):
        return pathlib.Path(os.fspath(path)).expanduser()
    source = as_path(path)
    target = cache_dir() / _text(path).replace("://", "/", 1)
    if probe(source, "is_file"):
        _fetch(source, target)
    elif probe(source, "is_dir"):
        for file, relative in _files(source, ""):
            if patterns is None or any(fnmatch.fnmatch(relative, p) for p in patterns):
                _fetch(file, target / relative)
        target.mkdir(parents=True, exist_ok=True)
    else:
        raise RemotePathError(f"{source} does not exist")
    return target


def _files(folder: epath.Path, prefix: str):
    for child in folder.iterdir():
        relative = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _files(child, relative + "/")
        else:
            yield child, relative


def _fetch(source: epath.Path, target: pathlib.Path) -> None:
    try:
        size = source.stat().length
        if target.is_file() and target.stat().st_size == size:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        with source.open("rb") as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(partial, target)
    except (OSError, ValueError) as err:
        raise RemotePathError(f"cannot copy {source} to {target}: {type(err).__name__}: {err}"
                              ) from err
