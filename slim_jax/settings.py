"""Where slim_jax finds local data: one setting for the whole library.

The environment variable `SLIM_JAX_DATA_DIR` names the folder that holds the data sets (the
layout of `shared/data`: `bbh/`, `commonsense/`, `gsm8k/`, `t0_templates/`, `tinystories260k/`,
...). Every command also takes `--data-dir`, which overrides it. Nothing in slim_jax hard-codes
that path.
"""

from __future__ import annotations

import os
from pathlib import Path

from slim_jax.errors import DataError

DATA_DIR_ENV = "SLIM_JAX_DATA_DIR"


def data_dir(
    override: str | os.PathLike[str] | None = None, *, required: str | None = None
) -> Path:
    """The local data folder: `override` if given, else `$SLIM_JAX_DATA_DIR`.

    Args:
      override: a path that wins over the environment variable (a `--data-dir` flag).
      required: a relative path (file or folder) that must exist inside the data folder; checked so
        that a wrong folder is reported here, naming what is missing, rather than later.

    Returns:
      The absolute data folder.

    Raises:
      DataError: when neither is set, the folder does not exist, or `required` is missing in it.

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
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (from {DATA_DIR_ENV} or --data-dir)")
    if required is not None and not (path / required).exists():
        raise DataError(
            f"data folder {path} has no {required!r}: point {DATA_DIR_ENV} or --data-dir "
            "at a folder laid out like shared/data"
        )
    return path
