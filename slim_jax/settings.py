"""Where slim_jax finds its data: one setting for the whole library.

The environment variable `SLIM_JAX_DATA_DIR` names the folder that holds the data sets (the
layout of `shared/data`: `bbh/`, `commonsense/`, `gsm8k/`, `t0_templates/`, `tinystories260k/`,
...): a local folder or a remote one (`gs://bucket/data`, read through `slim_jax.paths`). Every
command also takes `--data-dir`, which overrides it. Nothing in slim_jax hard-codes that path.
"""

from __future__ import annotations

import os
from pathlib import Path

from etils import epath

from slim_jax.errors import DataError
from slim_jax.paths import as_path, is_remote, probe

DATA_DIR_ENV = "SLIM_JAX_DATA_DIR"


def data_dir(
    override: str | os.PathLike[str] | None = None, *, required: str | None = None
) -> epath.Path:
    """The data folder: `override` if given, else `$SLIM_JAX_DATA_DIR`; local or remote.

    Args:
      override: a path that wins over the environment variable (a `--data-dir` flag).
      required: a relative path (file or folder) that must exist inside the data folder; checked so
        that a wrong folder is reported here, naming what is missing, rather than later.

    Returns:
      The data folder as an `epath.Path` (pathlib's methods; a URL such as `gs://bucket/data`
      stays whole when joined): an absolute local folder, or the URL.

    Raises:
      DataError: when neither is set, the folder does not exist, or `required` is missing in it
        (a remote folder that cannot be read: `RemotePathError`, naming the URL).

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     data_dir(d) == Path(d).resolve()
    True
    """
    raw = override if override is not None else os.environ.get(DATA_DIR_ENV)
    if not raw:
        raise DataError(
            f"no data folder given: set the environment variable {DATA_DIR_ENV} or pass --data-dir "
            "(a folder laid out like shared/data: bbh/, commonsense/, tinystories260k/, ...)"
        )
    path = as_path(raw)
    path = path if is_remote(path) else path.resolve()
    if not probe(path, "is_dir"):
        raise DataError(f"data folder {path} does not exist (from {DATA_DIR_ENV} or --data-dir)")
    if required is not None and not probe(path / required):
        raise DataError(
            f"data folder {path} has no {required!r}: point {DATA_DIR_ENV} or --data-dir "
            "at a folder laid out like shared/data"
        )
    return path


def locate(path: str, override: str | os.PathLike[str] | None = None) -> str:
    """Where a user-given model, tokenizer or adapter path points.

    `path` as given when it exists or is a URL (`gs://...`); else, for a relative path, the same
    path inside the data folder (`override` or `$SLIM_JAX_DATA_DIR`, local or remote) when it
    exists there; else `path` unchanged (a hub id, or a missing path that the loader then reports
    by name). So `tinystories260k/checkpoint_v1.bin` works from any directory.

    Raises:
      DataError: `override` is given but is not a folder (a wrong `--data-dir` is reported,
        never silently ignored); a URL that cannot be read (`RemotePathError`).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "model").mkdir()
    ...     locate("model", d) == str(Path(d).resolve() / "model"), locate("org/hub-id", d)
    (True, 'org/hub-id')
    """
    if is_remote(path):
        remote = as_path(path)
        probe(remote)  # a URL that cannot be read (no gcsfs, no access) is named here, in a line
        return str(remote)
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return str(given) if given.exists() else path
    if override is not None:
        folder = data_dir(override)
    else:
        try:
            folder = data_dir()
        except DataError:
            return path
    candidate = folder / given
    return str(candidate) if probe(candidate) else path


def enable_compilation_cache(folder: str | os.PathLike[str] | None) -> None:
    """Keep JAX's compiled programs in `folder` across runs (None or "": leave the cache off).

    A second run of the same experiment then skips compilation, which dominates small CPU runs.
    """
    if not folder:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(str(folder)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
