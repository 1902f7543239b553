"""Where an experiment command writes when no `--out` is given: `runs/<experiment>/<preset>-<time>`,
relative to the working directory, so that running the same command twice never collides."""

from __future__ import annotations

import time
from pathlib import Path

from slim_jax.parallel import leader_time


def default_run_folder(experiment: str, preset: str) -> Path:
    """`runs/<experiment>/<preset>-<YYYYmmdd-HHMMSS>`, on process 0's clock (every process of a
    multi-process job gets the same folder; all of them must call this).

    >>> default_run_folder("slim_finetune", "cpu").parent.as_posix()
    'runs/slim_finetune'
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(leader_time()))
    return Path("runs") / experiment / f"{preset}-{stamp}"
