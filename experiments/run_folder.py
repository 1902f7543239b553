"""Where an experiment command writes when no `--out` is given: `runs/<experiment>/<preset>-<time>`,
relative to the working directory, so that running the same command twice never collides."""

from __future__ import annotations

import time
from pathlib import Path

from slim_jax.errors import ConfigError
from slim_jax.parallel import leader_time
from slim_jax.paths import is_remote


def default_run_folder(experiment: str, preset: str) -> Path:
    """`runs/<experiment>/<preset>-<YYYYmmdd-HHMMSS>`, on process 0's clock (every process of a
    multi-process job gets the same folder; all of them must call this).

    >>> default_run_folder("slim_finetune", "cpu").parent.as_posix()
    'runs/slim_finetune'
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(leader_time()))
    return Path("runs") / experiment / f"{preset}-{stamp}"


def resolve_out(out: str | None, experiment: str, preset: str, flag: str = "--out") -> Path:
    """The run folder: `out` made absolute, or `default_run_folder` when it is None.

    Raises:
      ConfigError: `out` is a URL (`gs://...`): a run folder is written with local atomic
        renames, so it must be a local or mounted path (e.g. a gcsfuse mount of the bucket).

    >>> resolve_out("gs://bucket/run", "slim_finetune", "cpu")
    Traceback (most recent call last):
    ...
    slim_jax.errors.ConfigError: --out gs://bucket/run is a URL: run folders are written with \
local atomic renames; give a local path or a mounted bucket (e.g. gcsfuse), and read models and \
data from gs:// as they are
    """
    if out is None:
        return default_run_folder(experiment, preset).resolve()
    if is_remote(out):
        raise ConfigError(f"{flag} {out} is a URL: run folders are written with local atomic "
                          "renames; give a local path or a mounted bucket (e.g. gcsfuse), and "
                          "read models and data from gs:// as they are")
    return Path(out).expanduser().resolve()
