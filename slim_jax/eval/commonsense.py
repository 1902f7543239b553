"""Commonsense and knowledge sets in LLM-Adapters' format, from the data folder or the hub.

The data folder's `commonsense/` holds LLM-Adapters' files (BoolQ, PIQA, SIQA, WinoGrande, ARC,
OpenBookQA), some with a test split only. Sets or splits it lacks are read from the Hugging Face hub
(`slim_jax.data.read_hub`, so offline runs fail with a clear error) and written in the same format:
`Please choose the correct answer ...\\n\\nAnswer1: ... Answer2: ...\\n\\nAnswer format:
answer1/answer2`, response `the correct answer is answer2`. The hub's `test` splits of these sets
carry no labels, so `test` reads their `validation` split (as LLM-Adapters does).

MMLU (`cais/mmlu`) is read the same way, for measuring forgetting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slim_jax.data import ALPACA, Example, load_commonsense, read_hub
from slim_jax.data.sets import DataDir
from slim_jax.errors import ConfigError, DataError
from slim_jax.eval.answers import choices_from_instruction
from slim_jax.eval.tasks import CHOICE_RESPONSE, DownstreamTask, subsample
from slim_jax.settings import data_dir as resolve_data_dir


def choice_example(question: str, options: Sequence[str], answer_index: int, *,
                   stem: str = "Please choose the correct answer to the question",
                   word: str = "Answer", where: str = "record") -> Example:
    """One multiple-choice item in LLM-Adapters' format.

    >>> ex = choice_example("2+2?", ["3", "4"], 1)
    >>> print(ex.instruction)
    Please choose the correct answer to the question: 2+2?
    <BLANKLINE>
    Answer1: 3 Answer2: 4
    <BLANKLINE>
    Answer format: answer1/answer2
    >>> ex.response, ex.answer
    ('the correct answer is answer2', 'answer2')
    """
    if not 0 <= answer_index < len(options):
        raise DataError(f"{where}: answer index {answer_index} is outside its {len(options)} "
                        "options")
    listed = " ".join(f"{word}{i + 1}: {text.strip()}" for i, text in enumerate(options))
    formats = "/".join(f"{word.lower()}{i + 1}" for i in range(len(options)))
    answer = f"{word.lower()}{answer_index + 1}"
    instruction = f"{stem}: {question.strip()}\n\n{listed}\n\nAnswer format: {formats}"
    return Example(instruction, CHOICE_RESPONSE.format(choice=answer), answer=answer)


def _field(row: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: record has no field {name!r} (it has {sorted(row)})")
    return row[name]


def _index(value: Any, base: int, where: str) -> int:
    """A label such as `"2"`, `2` or `"B"` as a 0-based index (`base` is the first label)."""
    if isinstance(value, str) and len(value) == 1 and value.isalpha():
        return ord(value.upper()) - ord("A")
    try:
        return int(value) - base
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: label {value!r} is not an option number or letter") from err


def _siqa(row: Mapping[str, Any], where: str) -> Example:
    options = [_field(row, f"answer{c}", where) for c in "ABC"]
    question = f"{_field(row, 'context', where)} {_field(row, 'question', where)}"
    return choice_example(question, options, _index(_field(row, "label", where), 1, where),
                          where=where)


def _csqa(row: Mapping[str, Any], where: str) -> Example:
    options = list(_field(row, "choices", where)["text"])
    return choice_example(_field(row, "question", where), options,
                          _index(_field(row, "answerKey", where), 0, where), where=where)


def _hellaswag(row: Mapping[str, Any], where: str) -> Example:
    context = f"{_field(row, 'activity_label', where)}: {_field(row, 'ctx', where)}"
    return choice_example(context, list(_field(row, "endings", where)),
                          _index(_field(row, "label", where), 0, where),
                          stem="Please choose the correct ending to complete the given sentence",
                          word="Ending", where=where)


def _winogrande(row: Mapping[str, Any], where: str) -> Example:
    options = [_field(row, "option1", where), _field(row, "option2", where)]
    ex = choice_example(_field(row, "sentence", where), options,
                        _index(_field(row, "answer", where), 1, where),
                        stem="Please choose the correct answer to fill in the blank to complete "
                             "the given sentence", word="Option", where=where)
    # LLM-Adapters' WinoGrande puts the format on the options line.
    return Example(ex.instruction.replace("\n\nAnswer format", " Answer format"), ex.response,
                   answer=ex.answer)


def _mmlu(row: Mapping[str, Any], where: str) -> Example:
    return choice_example(_field(row, "question", where), list(_field(row, "choices", where)),
                          _index(_field(row, "answer", where), 0, where), where=where)


# name -> (hub dataset, config, {our split: hub split}, converter)
HUB_SETS: dict[str, tuple[str, str | None, dict[str, str],
                          Callable[[Mapping[str, Any], str], Example]]] = {
    "social_i_qa": ("allenai/social_i_qa", None, {"train": "train", "test": "validation"}, _siqa),
    "commonsense_qa": ("tau/commonsense_qa", None, {"train": "train", "test": "validation"},
                       _csqa),
    "hellaswag": ("Rowan/hellaswag", None, {"train": "train", "test": "validation"}, _hellaswag),
    "winogrande": ("allenai/winogrande", "winogrande_xl",
                   {"train": "train", "test": "validation"}, _winogrande),
    "mmlu": ("cais/mmlu", "all", {"train": "auxiliary_train", "test": "test"}, _mmlu),
}


def read_hub_set(name: str, split: str) -> list[Example]:
    """A set of `HUB_SETS` from the hub, converted to LLM-Adapters' format.

    Raises:
      DataError: unknown name or split, offline, or a record of the wrong shape (naming it).
    """
    if name not in HUB_SETS:
        raise DataError(f"no hub source for set {name!r}; known: {sorted(HUB_SETS)}")
    hub_name, config, splits, convert = HUB_SETS[name]
    if split not in splits:
        raise DataError(f"set {name!r} has no split {split!r}; accepted: {sorted(splits)}")
    records = read_hub(hub_name, (), split=splits[split], config=config)
    return [convert(row, records.where(i)) for i, row in enumerate(records.rows)]


def _local_folder(data_dir: DataDir) -> Path | None:
    try:
        return resolve_data_dir(data_dir) / "commonsense"
    except DataError:
        return None


def load_commonsense_split(name: str, split: str, data_dir: DataDir = None) -> list[Example]:
    """Split `train` or `test` of commonsense set `name`: the data folder's file when it has one,
    else the hub (`HUB_SETS`).

    Raises:
      DataError: neither has it (naming both places).
    """
    folder = _local_folder(data_dir)
    if folder is not None and (folder / name / f"{split}.json").is_file():
        return load_commonsense(name, split, data_dir)
    if name in HUB_SETS:
        return read_hub_set(name, split)
    where = f"{folder / name / (split + '.json')}" if folder is not None else "no data folder"
    raise DataError(f"commonsense set {name!r} split {split!r}: not in the data folder ({where}) "
                    f"and no hub source for it (hub sets: {sorted(HUB_SETS)})")


def commonsense_task(
    names: Sequence[str],
    data_dir: DataDir = None,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    name: str | None = None,
    with_train: bool = True,
) -> DownstreamTask:
    """Commonsense sets (`boolq`, `openbookqa`, `social_i_qa`, `ARC-Easy`, ..., `hellaswag`,
    `commonsense_qa`) mixed into one task in LLM-Adapters' format, with the Alpaca template.

    Each set's `train` and `test` splits come from the data folder, or from the hub where the
    folder lacks them (`HUB_SETS`). Caps apply per set; `with_train=False` reads the test split
    only (an evaluation-only task, e.g. PIQA for forgetting).

    >>> import json, pathlib, tempfile
    >>> row = {"instruction": "Q?\\n\\nAnswer format: true/false", "input": "",
    ...        "output": "the correct answer is true", "answer": "true"}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folder = pathlib.Path(d, "commonsense", "boolq"); folder.mkdir(parents=True)
    ...     for split in ("train", "test"):
    ...         _ = (folder / f"{split}.json").write_text(json.dumps([row, row]))
    ...     task = commonsense_task(["boolq"], d)
    >>> len(task.train), task.choices[0], task.response("true")
    (2, ('true', 'false'), 'the correct answer is true')
    """
    if not names:
        raise ConfigError("commonsense_task needs at least one set name")
    train: list[Example] = []
    test: list[Example] = []
    for set_name in names:
        if with_train:
            train.extend(subsample(load_commonsense_split(set_name, "train", data_dir),
                                   max_train, seed))
        test.extend(subsample(load_commonsense_split(set_name, "test", data_dir), max_test, seed))
    return DownstreamTask(
        name=name or "+".join(names),
        kind="choice",
        train=tuple(train),
        test=tuple(test),
        choices=tuple(choices_from_instruction(e.instruction) for e in test),
        template=ALPACA,
    )


def mmlu_task(*, max_test: int | None = None, seed: int = 0) -> DownstreamTask:
    """MMLU (all 57 subjects, test split, from the hub) as an evaluation-only `choice` task."""
    test = subsample(read_hub_set("mmlu", "test"), max_test, seed)
    return DownstreamTask("mmlu", "choice", train=(), test=test,
                          choices=tuple(choices_from_instruction(e.instruction) for e in test),
                          template=ALPACA)
