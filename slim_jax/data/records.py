"""Raw records from JSON / JSONL files (local or remote: `gs://...`, through `slim_jax.paths`) or a
Hugging Face hub dataset, validated on entry.

Every record must be a JSON object holding each required field as a string. A record that does not
is reported with where it came from (`train.jsonl line 12`, `test.json index 3`, `hub dataset 'imdb'
split 'train' row 7`), so a bad file is fixed at its source instead of surfacing later as a shape
error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etils import epath

from slim_jax.errors import DataError
from slim_jax.paths import as_path, is_remote, probe

LOCAL_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Records:
    """Validated records and where each one came from.

    Attributes:
      rows: the records, JSON objects as dicts.
      origin: the file path or hub dataset they were read from.
      unit: how a position is named in messages: `"line"` (JSONL, 1-based), `"index"` (JSON list,
        0-based) or `"row"` (hub dataset, 0-based).
      positions: the line, index or row of each record, aligned with `rows`.
    """

    rows: tuple[dict[str, Any], ...]
    origin: str
    unit: str
    positions: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """Where record `i` came from, for error messages: `'<origin> line 12'`."""
        return f"{self.origin} {self.unit} {self.positions[i]}"


def check_record(record: Any, required: Sequence[str], where: str) -> dict[str, Any]:
    """Return `record` if it is an object with every `required` field as a string, else raise.

    >>> check_record({"prompt": "a", "completion": "b"}, ("prompt",), "x.jsonl line 1")["prompt"]
    'a'
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with fields {list(required)}, "
                        f"got {type(record).__name__}")
    for field in required:
        if field not in record:
            raise DataError(f"{where}: record has no field {field!r} (it has {sorted(record)}); "
                            f"every record needs {list(required)}")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, "
                            f"got {type(record[field]).__name__} {record[field]!r:.60}")
    return record


def read_jsonl(path: str | os.PathLike[str], required: Sequence[str] = ()) -> Records:
    """Records of a JSONL file (one JSON object a line; blank lines skipped), each validated.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = pathlib.Path(d, "a.jsonl"); _ = p.write_text('{"q": "1+1", "a": "2"}\\n')
    ...     read_jsonl(p, ("q", "a")).rows
    ({'q': '1+1', 'a': '2'},)
    """
    path = _existing_file(path)
    rows, positions = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                reason = err.msg.removesuffix(" at")  # "Invalid control character at"
                raise DataError(f"{where}: not valid JSON ({reason} at column "
                                f"{err.colno})") from err
            rows.append(check_record(record, required, where))
            positions.append(number)
    return Records(tuple(rows), str(path), "line", tuple(positions))


def read_json(
    path: str | os.PathLike[str], required: Sequence[str] = (), *, key: str | None = None
) -> Records:
    """Records of a JSON file holding a list of objects (or an object whose `key` holds that list).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = pathlib.Path(d, "a.json"); _ = p.write_text('{"examples": [{"input": "x"}]}')
    ...     read_json(p, ("input",), key="examples").where(0).endswith("a.json examples index 0")
    True
    """
    path = _existing_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from err
    origin = str(path)
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: expected a JSON object with a {key!r} list of records")
        data, origin = data[key], f"{path} {key}"
    if not isinstance(data, list):
        raise DataError(f"{origin}: expected a JSON list of records, got {type(data).__name__}")
    rows = tuple(check_record(r, required, f"{origin} index {i}") for i, r in enumerate(data))
    return Records(rows, origin, "index", tuple(range(len(rows))))


def read_hub(
    name: str, required: Sequence[str] = (), *, split: str = "train", config: str | None = None
) -> Records:
    """Records of a Hugging Face hub dataset via `datasets.load_dataset` (needs network access).

    Raises:
      DataError: offline (`HF_HUB_OFFLINE`), the hub unreachable, the dataset, config or split
        unknown, or a record without a required string field.
    """
    import datasets  # deferred: importing datasets takes seconds and most runs read local files

    origin = f"hub dataset {name!r}" + (f" config {config!r}" if config else "")
    origin += f" split {split!r}"
    if datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"cannot load {origin}: Hugging Face hub offline mode is on "
                        "(HF_HUB_OFFLINE); use a local JSON/JSONL file or a data folder instead")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, OSError, ValueError) as err:
        raise DataError(f"cannot load {origin} ({type(err).__name__}: {err}); offline or unknown "
                        "name: use a local JSON/JSONL file or a data folder instead") from err
    rows = tuple(check_record(r, required, f"{origin} row {i}") for i, r in enumerate(dataset))
    return Records(rows, origin, "row", tuple(range(len(rows))))


def load_records(
    source: str | os.PathLike[str],
    required: Sequence[str] = (),
    *,
    split: str = "train",
    config: str | None = None,
) -> Records:
    """Records from a local `.json` / `.jsonl` file, or else from the hub dataset named `source`.

    A `source` that is a `Path`, a URL (`gs://...`), an existing file, ends in `.json`/`.jsonl`, or
    starts like a path (`/`, `.`, `~`) is a file; anything else (`"imdb"`, `"lukaemon/bbh"` with
    `config="snarks"`) names a hub dataset, whose `split` and `config` are then used.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = pathlib.Path(d, "a.json"); _ = p.write_text('[{"prompt": "Hi"}]')
    ...     len(load_records(str(p), ("prompt",)))
    1
    """
    text = os.fspath(source)
    path = as_path(text)
    local = (isinstance(source, Path | epath.Path) or is_remote(text)
             or path.suffix in LOCAL_SUFFIXES or probe(path, "is_file"))
    if local or text.startswith(("/", ".", "~", os.sep)):
        if path.suffix == ".jsonl":
            return read_jsonl(path, required)
        if path.suffix == ".json":
            return read_json(path, required)
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; accepted: .json (a list "
                        "of records) or .jsonl (one record a line)")
    return read_hub(text, required, split=split, config=config)


def _existing_file(path: str | os.PathLike[str]) -> epath.Path:
    path = as_path(path)
    if not probe(path, "is_file"):
        raise DataError(f"data file {path} does not exist")
    return path
