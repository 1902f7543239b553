"""Loaders for the local data sets of the shared data folder, as `Example`s.

The folder comes from `slim_jax.settings.data_dir` (`$SLIM_JAX_DATA_DIR` or `--data-dir`):
- `commonsense/<name>/<split>.json`: lists of `{instruction, input, output, answer}` (LLM-Adapters);
- `gsm8k/<split>.jsonl`: `{question, answer}`, the final answer after `#### `;
- `t0_templates/<name>.jsonl`: `{prompt, completion}`, completions ending in `<|endoftext|>`.
"""

from __future__ import annotations

import difflib
import os

from etils import epath

from slim_jax.data.examples import Example
from slim_jax.data.records import read_json, read_jsonl
from slim_jax.errors import DataError
from slim_jax.settings import data_dir as resolve_data_dir

COMMONSENSE_FIELDS = ("instruction", "input", "output", "answer")
GSM8K_FIELDS = ("question", "answer")
GSM8K_ANSWER_MARK = "#### "
T0_FIELDS = ("prompt", "completion")
T0_END = "<|endoftext|>"

DataDir = str | os.PathLike[str] | None


def commonsense_names(data_dir: DataDir = None) -> list[str]:
    """The commonsense sets present in the data folder (`boolq`, `piqa`, `ARC-Easy`, ...)."""
    root = resolve_data_dir(data_dir, required="commonsense") / "commonsense"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def load_commonsense(name: str, split: str = "train", data_dir: DataDir = None) -> list[Example]:
    """One commonsense set as examples: instruction, input, response (`output`), answer.

    `output` reads `the correct answer is <answer>`, so a generated response is scored by extracting
    the word after `is`; `answer` holds that word (`true`, `answer2`, `solution1`, `option2`).

    Raises:
      DataError: unknown set or split (naming those present), or a record without a required field
        (naming the file and index).
    """
    root = resolve_data_dir(data_dir, required="commonsense") / "commonsense"
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"no commonsense set {name!r} in {root}; present: "
                        f"{commonsense_names(data_dir)}")
    path = folder / f"{split}.json"
    if not path.is_file():
        splits = sorted(p.stem for p in folder.glob("*.json"))
        raise DataError(f"commonsense set {name!r} has no split {split!r}; present: {splits}")
    records = read_json(path, COMMONSENSE_FIELDS)
    return [Example(r["instruction"], r["output"], input=r["input"], answer=r["answer"])
            for r in records.rows]


def gsm8k_final_answer(solution: str, where: str = "GSM8K solution") -> str:
    """The final answer of a GSM8K solution: the text after its last `#### `, stripped.

    >>> gsm8k_final_answer("5 + 4 = <<5+4=9>>9\\n#### 9")
    '9'
    """
    _, mark, tail = solution.rpartition(GSM8K_ANSWER_MARK)
    if not mark:
        raise DataError(f"{where}: answer has no final answer after {GSM8K_ANSWER_MARK!r}: "
                        f"{solution[-80:]!r}")
    return tail.strip()


def load_gsm8k(split: str = "train", data_dir: DataDir = None) -> list[Example]:
    """GSM8K as examples: the question, the worked solution as response, the final number as answer.

    Raises:
      DataError: unknown split, or a record without `question`/`answer` or without `#### `
        (naming the file and line).
    """
    root = resolve_data_dir(data_dir, required="gsm8k") / "gsm8k"
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"GSM8K has no split {split!r} in {root}; "
                        f"present: {sorted(p.stem for p in root.glob('*.jsonl'))}")
    records = read_jsonl(path, GSM8K_FIELDS)
    return [Example(r["question"], r["answer"],
                    answer=gsm8k_final_answer(r["answer"], records.where(i)))
            for i, r in enumerate(records.rows)]


def t0_template_names(data_dir: DataDir = None) -> list[str]:
    """Names of the T0 template tasks in the data folder (file stems of `t0_templates/*.jsonl`)."""
    root = resolve_data_dir(data_dir, required="t0_templates") / "t0_templates"
    return sorted(p.stem for p in root.glob("*.jsonl"))


def t0_template_path(name: str, data_dir: DataDir = None) -> epath.Path:
    """The file of T0 template task `name`; an unknown name is an error suggesting close ones."""
    root = resolve_data_dir(data_dir, required="t0_templates") / "t0_templates"
    path = root / f"{name}.jsonl"
    if not path.is_file():
        names = t0_template_names(data_dir)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        raise DataError(f"no T0 template task {name!r} in {root} ({len(names)} present"
                        + (f"; close names: {close})" if close else ")"))
    return path


def load_t0_template(name: str, data_dir: DataDir = None) -> list[Example]:
    """A T0 template task as examples: the prompt and the completion without `<|endoftext|>`.

    The completion is also the `answer` (for the classification templates it is the label).

    Raises:
      DataError: unknown name (suggesting close ones), an empty file, or a record without
        `prompt`/`completion` (naming the file and line).
    """
    path = t0_template_path(name, data_dir)
    records = read_jsonl(path, T0_FIELDS)
    if not records.rows:
        raise DataError(f"T0 template file {path} has no records")
    examples = []
    for r in records.rows:
        completion = r["completion"].removesuffix(T0_END)
        examples.append(Example(r["prompt"], completion, answer=completion))
    return examples
