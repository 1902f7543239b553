"""BIG-Bench Hard as LoRAHub evaluates it (LORAHUB.md s5): loading, prompts, ADAPT split, scoring.

- Prompt: `<task description>\\n\\nQ: <input>\\nA:`; the target is the BBH target string (`(E)`,
  `False`, `24`).
- In-context prompt: the same with the K ADAPT examples in front, as `Q: <input>\\nA: <target>`
  shots.
- ADAPT examples: as the reference's `reproduce_bbh.py` draws them: `random.seed(42)`, shuffle the
  list of (input, target) pairs, take the first 5 (`adapt_indices`). The test set is the task's
  remaining examples in file order, so ADAPT and test never overlap (the reference code tests on
  all examples, ADAPT ones included).
- Exact match (LORAHUB.md s5): `pred.strip().lower().replace(".", "")` equals the target normalised
  the same way; score = 100 x mean.

Data: `<data_dir>/bbh/<task>.json` (`{"canary", "examples": [{"input", "target"}]}`) with the
description from `<data_dir>/bbh/cot-prompts/<task>.txt`, or the hub dataset `lukaemon/bbh` (one
config per task, split `test`) with the descriptions of `bbh_tasks.py`.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from etils import epath

from slim_jax.data.bbh_tasks import BBH_DESCRIPTIONS, BBH_TASKS
from slim_jax.data.examples import Example
from slim_jax.data.records import Records, read_hub, read_json
from slim_jax.data.sets import DataDir
from slim_jax.errors import ConfigError, DataError
from slim_jax.settings import data_dir as resolve_data_dir

BBH_HUB_NAME = "lukaemon/bbh"
ADAPT_K = 5
ADAPT_SEED = 42
_SEPARATOR = "-----"


@dataclass(frozen=True)
class BBHExample:
    """One BBH example: the question text and the exact target string."""

    input: str
    target: str


def bbh_prompt(description: str, question: str) -> str:
    """LoRAHub's zero-shot prompt.

    >>> bbh_prompt("Sort a list of words.", "List: b a")
    'Sort a list of words.\\n\\nQ: List: b a\\nA:'
    """
    return f"{description}\n\nQ: {question}\nA:"


def bbh_icl_prompt(description: str, shots: Sequence[BBHExample], question: str) -> str:
    """The in-context prompt: the shots as `Q: ..\\nA: <target>` blocks before the question.

    >>> bbh_icl_prompt("Sort.", [BBHExample("b a", "a b")], "d c")
    'Sort.\\n\\nQ: b a\\nA: a b\\n\\nQ: d c\\nA:'
    """
    blocks = [f"Q: {s.input}\nA: {s.target}" for s in shots] + [f"Q: {question}\nA:"]
    return description + "\n\n" + "\n\n".join(blocks)


def adapt_indices(num_examples: int, k: int = ADAPT_K, seed: int = ADAPT_SEED) -> list[int]:
    """Indices of the K ADAPT examples, drawn as the reference (`reproduce_bbh.py`) draws them.

    The reference seeds Python's generator with `seed`, shuffles the list of the task's
    (input, target) pairs and keeps the first K; a shuffle's permutation depends only on the
    list's length, so shuffling the indices `0..n-1` the same way names the same examples.

    >>> adapt_indices(250)
    [44, 98, 184, 123, 121]
    """
    if not 0 <= k <= num_examples:
        raise ConfigError(f"K={k} ADAPT examples requested but the task has {num_examples} "
                          f"examples; choose 0 <= K <= {num_examples}")
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)  # reproduce_bbh.py: random.seed(42); random.shuffle(pairs)
    return order[:k]


@dataclass(frozen=True)
class BBHTask:
    """One BBH task.

    Attributes:
      name: the task (one of `BBH_TASKS`).
      description: the line after `-----` in `cot-prompts/<name>.txt`.
      examples: all examples, in file order.
    """

    name: str
    description: str
    examples: tuple[BBHExample, ...]

    def prompt(self, question: str) -> str:
        """The zero-shot prompt of `question` (`bbh_prompt`)."""
        return bbh_prompt(self.description, question)

    def icl_prompt(self, shots: Sequence[BBHExample], question: str) -> str:
        """The in-context prompt of `question` with `shots` in front (`bbh_icl_prompt`)."""
        return bbh_icl_prompt(self.description, shots, question)

    def adapt_split(
        self, k: int = ADAPT_K, seed: int = ADAPT_SEED
    ) -> tuple[tuple[BBHExample, ...], tuple[BBHExample, ...]]:
        """`(adapt, test)`: the K examples of `adapt_indices` (in draw order) and the others (in
        file order), disjoint.

        Raises:
          ConfigError: `k` larger than the task's number of examples (naming both).
        """
        try:
            chosen = adapt_indices(len(self.examples), k, seed)
        except ConfigError as err:
            raise ConfigError(f"BBH task {self.name!r}: {err}") from None
        taken = set(chosen)
        return (tuple(self.examples[i] for i in chosen),
                tuple(e for i, e in enumerate(self.examples) if i not in taken))

    def as_examples(
        self, examples: Iterable[BBHExample], shots: Sequence[BBHExample] = ()
    ) -> list[Example]:
        """Prompt/target pairs for tokenisation (`slim_jax.data.tokenize_examples`): the prompt
        (in-context when `shots` are given) as instruction, the target as response and answer.

        A causal tokenizer encodes the response apart, so `(A)` is read as the word after `A:`.
        """
        return [Example(self.icl_prompt(shots, e.input) if shots else self.prompt(e.input),
                        e.target, answer=e.target) for e in examples]


def check_task_name(name: str) -> str:
    """`name` if it is a BBH task, else a `DataError` listing the valid names.

    >>> check_task_name("snarks")
    'snarks'
    """
    if name not in BBH_DESCRIPTIONS:
        close = difflib.get_close_matches(name, BBH_TASKS, n=3, cutoff=0.6)
        hint = f"did you mean {close}? " if close else ""
        raise DataError(f"{name!r} is not a BIG-Bench Hard task; {hint}valid: "
                        f"{', '.join(BBH_TASKS)}")
    return name


def read_description(path: epath.Path) -> str:
    """The task description of a `cot-prompts/<task>.txt` file: the line after `-----`."""
    if not path.is_file():
        raise DataError(f"BBH prompt file {path} does not exist (the bbh/ layout has "
                        "cot-prompts/<task>.txt beside <task>.json)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if _SEPARATOR not in lines or lines.index(_SEPARATOR) + 1 >= len(lines):
        raise DataError(f"{path}: no task description line after a {_SEPARATOR!r} line")
    return lines[lines.index(_SEPARATOR) + 1].strip()


def load_bbh_task(
    name: str, data_dir: DataDir = None, *, source: Literal["local", "hub"] = "local"
) -> BBHTask:
    """One BBH task from the data folder's `bbh/` (default) or from the hub (`lukaemon/bbh`).

    Raises:
      DataError: an unknown task (listing the valid ones), missing files, records without
        `input`/`target` (naming file and index), or the hub unreachable.

    >>> import json, pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     bbh = pathlib.Path(d, "bbh"); (bbh / "cot-prompts").mkdir(parents=True)
    ...     _ = (bbh / "snarks.json").write_text(json.dumps(
    ...         {"canary": "", "examples": [{"input": "Which is sarcastic?", "target": "(A)"}]}))
    ...     _ = (bbh / "cot-prompts" / "snarks.txt").write_text(
    ...         "canary\\n-----\\nFind sarcasm.\\n\\nQ: ...")
    ...     task = load_bbh_task("snarks", d)
    >>> task.prompt(task.examples[0].input)
    'Find sarcasm.\\n\\nQ: Which is sarcastic?\\nA:'
    """
    check_task_name(name)
    if source == "hub":
        records = read_hub(BBH_HUB_NAME, ("input", "target"), split="test", config=name)
        description = BBH_DESCRIPTIONS[name]
    elif source == "local":
        root = resolve_data_dir(data_dir, required="bbh") / "bbh"
        records = read_json(root / f"{name}.json", ("input", "target"), key="examples")
        description = read_description(root / "cot-prompts" / f"{name}.txt")
    else:
        raise ConfigError(f"source must be 'local' or 'hub', got {source!r}")
    return BBHTask(name, description, _examples(records))


def load_bbh(
    names: Sequence[str] | None = None,
    data_dir: DataDir = None,
    *,
    source: Literal["local", "hub"] = "local",
) -> dict[str, BBHTask]:
    """Several BBH tasks by name (all 27 when `names` is None), in the order given."""
    chosen = BBH_TASKS if names is None else tuple(check_task_name(n) for n in names)
    return {n: load_bbh_task(n, data_dir, source=source) for n in chosen}


def _examples(records: Records) -> tuple[BBHExample, ...]:
    if not records.rows:
        raise DataError(f"{records.origin}: no examples")
    return tuple(BBHExample(r["input"], r["target"]) for r in records.rows)


def normalize_answer(text: str) -> str:
    """LoRAHub's normalisation: strip, lower-case, remove every `.`.

    >>> normalize_answer("  False. "), normalize_answer("(A)")
    ('false', '(a)')
    """
    return text.strip().lower().replace(".", "")


def exact_match(prediction: str, target: str) -> bool:
    """Whether the prediction equals the target after `normalize_answer` on both.

    >>> exact_match("False.", "False"), exact_match("(A) because", "(A)")
    (True, False)
    """
    return normalize_answer(prediction) == normalize_answer(target)


def exact_match_score(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """100 x the mean exact match over aligned predictions and targets.

    >>> exact_match_score(["(A)", "true", "7"], ["(A)", "False", "7"])
    66.66666666666667
    """
    if len(predictions) != len(targets):
        raise ConfigError(f"{len(predictions)} predictions for {len(targets)} targets: they must "
                          "align one to one")
    if not targets:
        raise ConfigError("no predictions to score")
    return 100.0 * sum(map(exact_match, predictions, targets)) / len(targets)
