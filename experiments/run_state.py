"""The run folder's state, shared by the long commands: resume, refuse, mark finished, stop.

The contract (README, "Stop and resume"): a command writes into `--out`; every unit of work
(a method x seed, a BBH task, an upstream module) is recorded finished only when it is, by one
atomic write at its very end; the folder is marked finished (`FINISHED`) after the last unit.
Running the same command with the same `--out` again resumes: finished units are read back, an
interrupted one continues from its checkpoint. A finished folder is refused unless
`--overwrite`; a folder holding another config's unfinished run is refused too.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     out = Path(d) / "run"
...     open_run_folder(out, {"steps": 3}, overwrite=False)
...     mark_finished(out)
...     try:
...         open_run_folder(out, {"steps": 3}, overwrite=False)
...     except ConfigError as err:
...         print(str(err).split(";")[0].endswith("holds a finished run"))
False
True
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slim_jax.errors import ConfigError

FINISHED = "FINISHED"
BOOL_WORDS = ("true", "false", "yes", "no", "1", "0", "on", "off")
CONFIG = "config.json"
# Fields that may change between an interrupted run and its resumption without changing results.
NOT_COMPARED = frozenset({"out", "overwrite", "workers", "progress", "compilation_cache",
                          "num_devices", "data_dir"})


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one, never a part
    (a temporary file beside it, then `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file this package wrote, or None when it is missing."""
    return json.loads(path.read_text()) if path.is_file() else None


def check_out(out: Path, flag: str = "--out") -> None:
    """Raise ConfigError (naming `flag`) if `out` is an existing file or cannot be written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file; give a folder (new, or one this command "
                          "wrote to resume it)")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    try:  # a real try: permission bits do not tell (root, read-only mounts, /proc)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test-"))
    except (OSError, TypeError):
        raise ConfigError(f"{flag} {out}: cannot create or write in {existing}; give a folder "
                          "you can write to") from None


def refuse_finished(out: Path, *, overwrite: bool, flag: str = "--out") -> None:
    """Raise ConfigError if `out` holds a finished run and `overwrite` is off."""
    if (out / FINISHED).exists() and not overwrite:
        raise ConfigError(f"{flag} {out} holds a finished run; choose a new {flag}, or pass "
                          "--overwrite to run it again")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for key in sorted(set(old) | set(new)):
            if key in NOT_COMPARED and not prefix:
                continue
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]


def open_run_folder(out: Path, config: Mapping[str, Any], *, overwrite: bool,
                    flag: str = "--out", create: bool = True) -> bool:
    """Make `out` ready for a run of `config` (JSON-like); return True when it resumes an
    interrupted run of the same config there. With `create=False` only check (nothing is
    written or deleted), so bad input is refused before long work.

    Raises:
      ConfigError: `out` is a file or not writable; it holds a finished run (without
        `overwrite`); it holds an unfinished run of a different config (naming the fields).
    """
    check_out(out, flag)
    config = json.loads(json.dumps(config, default=str))
    old = read_json(out / CONFIG) if out.is_dir() else None
    if overwrite and out.is_dir() and any(out.iterdir()):
        if old is None:
            raise ConfigError(f"{flag} {out} is not empty and not a run folder of this command; "
                              "--overwrite deletes only run folders: choose another folder")
        if not create:
            return False
        shutil.rmtree(out)
        old = None
    refuse_finished(out, overwrite=False, flag=flag)
    if old is not None:
        changed = _differences(old, config)
        if changed:
            raise ConfigError(f"{flag} {out} holds an unfinished run of another config "
                              f"(different: {', '.join(changed[:6])}); resume it with its own "
                              f"command ({out / 'command.txt'}), or pass --overwrite")
        return True
    if create:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, config)
    return False


def mark_finished(out: Path) -> None:
    """Mark `out` as holding a finished run (the last write of a command)."""
    write_atomic(out / FINISHED, "finished\n")


def resume_command(prog: str, argv: Sequence[str], out: Path) -> str:
    """The command line that resumes: `argv` with `--out` set to `out`, without --overwrite."""
    args: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--out" or (arg == "--overwrite" and rest and rest[0].lower() in BOOL_WORDS):
            rest = rest[1:]
        elif arg not in ("--overwrite", "--no-overwrite") and not arg.startswith(
                ("--out=", "--overwrite=")):
            args.append(arg)
    return shlex.join([*prog.split(), *args, "--out", str(out)])


def stop_message(prog: str, signal_name: str, saved: Iterable[str], argv: Sequence[str],
                 out: Path) -> str:
    """The one line a stopped command prints: what stopped it, what is saved, how to resume."""
    return (f"{prog}: stopped by {signal_name}; saved: {'; '.join(saved) or 'nothing yet'}; "
            f"resume with: {resume_command(prog, argv, out)}")
