"""Downstream tasks: training examples, test questions with their choices, and how to score them.

A `DownstreamTask` is what fine-tuning learns and what downstream accuracy measures. Each test
example carries its choice set (`choices[i]`), so one task may mix data sets or prompt templates
whose label strings differ:
- `label`: the response is a label string (T0 classification templates);
- `choice`: the response reads `the correct answer is <choice>` (the LLM-Adapters commonsense
  format; choices come from the instruction's `Answer format:` line);
- `number`: the answer is the final number of a worked solution (GSM8K); no choice set, so only
  generation can score it.

Builders: `t0_classification_task` (several templates of one source, split by source item so no
test item is ever trained on in another template), `gsm8k_task`; commonsense sets and MMLU are in
`slim_jax.eval.commonsense`.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Literal

from slim_jax.data import ALPACA, PLAIN, Example, PromptTemplate, load_gsm8k, load_t0_template
from slim_jax.data.sets import DataDir
from slim_jax.data.t0_tasks import stratified_split
from slim_jax.errors import ConfigError, DataError
from slim_jax.eval.answers import (
    extract_choice,
    extract_label,
    extract_number,
    normalize,
    same_number,
)

AnswerKind = Literal["label", "choice", "number"]
ANSWER_KINDS: tuple[str, ...] = ("label", "choice", "number")
CHOICE_RESPONSE = "the correct answer is {choice}"


@dataclasses.dataclass(frozen=True)
class DownstreamTask:
    """A fine-tuning task and its test set.

    Attributes:
      name: for tables and logs.
      kind: how answers are read (see the module docstring).
      train: training examples (`response` is the text trained on).
      test: test examples (`answer` is the reference).
      choices: per test example, its choice set (labels or commonsense choices); `()` for
        `number` tasks.
      template: renders an example as (prompt, response) text.

    >>> task = DownstreamTask("toy", "label", train=(Example("Q1\\n", "yes", answer="yes"),),
    ...     test=(Example("Q2\\n", "no", answer="no"),), choices=(("no", "yes"),))
    >>> task.is_correct(task.extract(" no", 0), 0), task.response("yes")
    (True, 'yes')
    """

    name: str
    kind: AnswerKind
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    choices: tuple[tuple[str, ...], ...]
    template: PromptTemplate = PLAIN

    def __post_init__(self) -> None:
        if self.kind not in ANSWER_KINDS:
            raise ConfigError(f"task kind must be one of {ANSWER_KINDS}, got {self.kind!r}")
        if not self.test:
            raise DataError(f"task {self.name!r} has no test examples")
        if len(self.choices) != len(self.test):
            raise DataError(f"task {self.name!r}: {len(self.choices)} choice sets for "
                            f"{len(self.test)} test examples")
        for i, (example, options) in enumerate(zip(self.test, self.choices, strict=True)):
            if example.answer is None:
                raise DataError(f"task {self.name!r}: test example {i} has no reference answer")
            if self.kind != "number" and example.answer not in options:
                raise DataError(f"task {self.name!r}: test example {i} answers "
                                f"{example.answer!r}, not one of its choices {options}")

    def prompt(self, example: Example) -> str:
        """The prompt text the model is conditioned on."""
        return self.template.render(example)[0]

    def response(self, choice: str) -> str:
        """The response text that states `choice` (what likelihood scoring scores)."""
        if self.kind == "number":
            raise ConfigError(f"task {self.name!r} answers with numbers: it has no choice set to "
                              "score by likelihood; evaluate it by generation")
        return CHOICE_RESPONSE.format(choice=choice) if self.kind == "choice" else choice

    def extract(self, text: str, index: int) -> str | None:
        """The answer a generated `text` gives to test example `index` (None if none)."""
        if self.kind == "number":
            return extract_number(text)
        if self.kind == "choice":
            return extract_choice(text, self.choices[index])
        return extract_label(text, self.choices[index])

    def is_correct(self, predicted: str | None, index: int) -> bool:
        """Whether `predicted` matches test example `index`'s answer."""
        answer = self.test[index].answer
        assert answer is not None
        if self.kind == "number":
            return same_number(predicted, answer)
        return predicted is not None and normalize(predicted) == normalize(answer)

    def majority_accuracy(self) -> float:
        """Accuracy of always giving the most frequent answer position of the test set: the
        chance line (for label tasks, the majority class share)."""
        if self.kind == "number":
            return 0.0
        positions = Counter(options.index(ex.answer)  # type: ignore[arg-type]
                            for ex, options in zip(self.test, self.choices, strict=True))
        return max(positions.values()) / len(self.test)


def subsample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """At most `limit` of the indices `0..n-1`, drawn with `random.Random(seed)`, ascending.

    >>> subsample_indices(5, 2, seed=0), subsample_indices(3, None, seed=0)
    ([3, 4], [0, 1, 2])
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ConfigError(f"an example limit must be >= 1 or None, got {limit}")
    return sorted(random.Random(seed).sample(range(n), limit))


def subsample(examples: Sequence[Example], limit: int | None, seed: int) -> tuple[Example, ...]:
    """At most `limit` examples (`subsample_indices`), in their original order."""
    return tuple(examples[i] for i in subsample_indices(len(examples), limit, seed))


def shorten_passage(example: Example, max_words: int,
                    template_lines: Collection[str] = frozenset()) -> Example:
    """`example` with its passage (the longest line of its instruction that is not one of the
    template's own `template_lines`: the article, review or context a T0 template wraps in a
    question) cut to its first `max_words` words.

    News and reviews put their gist first (a title, a lead sentence), so a short prefix keeps the
    signal while prompts fit much shorter rows, which matters for small models on a CPU.

    >>> shorten_passage(Example("Q?\\nOne two three four.\\n", "a"), 2).instruction
    'Q?\\nOne two\\n'
    >>> shorten_passage(Example("Is it a long question?\\nA b.", "a"), 1, {"Is it a long question?"}
    ...                 ).instruction
    'Is it a long question?\\nA'
    """
    if max_words < 1:
        raise ConfigError(f"max_passage_words must be >= 1 or None, got {max_words}")
    lines = example.instruction.split("\n")
    own = [i for i, line in enumerate(lines) if line not in template_lines]
    if not own:
        return example
    passage = max(own, key=lambda i: len(lines[i]))
    lines[passage] = " ".join(lines[passage].split()[:max_words])
    return dataclasses.replace(example, instruction="\n".join(lines))


def template_lines(examples: Sequence[Example]) -> frozenset[str]:
    """Lines that recur in the instructions of several examples: a template's own wording.

    >>> sorted(template_lines([Example("A\\nQ?", ""), Example("B\\nQ?", "")]))
    ['Q?']
    """
    counts = Counter(line for e in examples for line in set(e.instruction.split("\n")))
    return frozenset(line for line, n in counts.items() if n > 1)


def _check_aligned(names: Sequence[str], sets: Sequence[list[Example]]) -> None:
    """Templates of one source hold the same items in the same order: equal lengths and labels
    that correspond one-to-one item by item."""
    first = [e.answer for e in sets[0]]
    for name, examples in zip(names[1:], sets[1:], strict=True):
        if len(examples) != len(first):
            raise DataError(f"T0 templates {names[0]!r} ({len(first)} items) and {name!r} "
                            f"({len(examples)}) do not hold the same items; combine only templates "
                            "of one source")
        pairs = set(zip(first, (e.answer for e in examples), strict=True))
        if len(pairs) != len(set(first)) or len({b for _, b in pairs}) != len(pairs):
            raise DataError(f"T0 templates {names[0]!r} and {name!r}: labels do not correspond "
                            "item by item, so they do not hold the same items in the same order")


def t0_classification_task(
    names: Sequence[str],
    data_dir: DataDir = None,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    max_passage_words: int | None = None,
    validation: bool = False,
    name: str | None = None,
) -> DownstreamTask:
    """Several T0 templates of one source (e.g. the 7 `ag_news_*`) as one classification task.

    The templates hold the same items in the same order, so the split is made once over item
    indices (stratified by the first template's labels, `random.Random(seed)`) and applied to
    every template: an item is in test under every template or under none, and the test set grows
    `len(names)`-fold without leaking a test item into training.

    Args:
      names: template tasks (file stems in `t0_templates/`); each must have 2+ labels.
      data_dir: the data folder (default `slim_jax.settings.data_dir()`).
      test_fraction: share of items held out, per label.
      seed: split seed.
      max_train, max_test: optional caps (seeded subsamples).
      max_passage_words: cut every prompt's passage to its first words (`shorten_passage`;
        the template's own lines, those shared by several items, are never cut), in training
        and test alike; None keeps prompts whole.
      validation: evaluate on a validation split instead of the test items, for choosing
        settings without looking at the test set: the training items are split again (the same
        `test_fraction`, stratified, seeded) into training and validation items; the test items
        are not used at all.
      name: the task's name (default: the common prefix of the names).

    Raises:
      DataError: unknown template, a single-label template, or templates of different sources.
    """
    if not names:
        raise ConfigError("t0_classification_task needs at least one template name")
    sets = [load_t0_template(n, data_dir) for n in names]
    if max_passage_words is not None:
        sets = [[shorten_passage(e, max_passage_words, fixed) for e in examples]
                for examples, fixed in ((x, template_lines(x)) for x in sets)]
    for template, examples in zip(names, sets, strict=True):
        if len({e.answer for e in examples}) < 2:
            raise DataError(f"T0 template {template!r} has a single label for every item: "
                            "nothing to learn; pick a template with several labels")
    _check_aligned(names, sets)
    item_labels = [e.answer for e in sets[0]]
    train_items, test_items = stratified_split(item_labels, test_fraction, seed)
    if validation:  # held out from the training items; test items stay unseen
        fit, held = stratified_split([item_labels[i] for i in train_items], test_fraction, seed)
        train_items, test_items = [train_items[i] for i in fit], [train_items[i] for i in held]
    train = [examples[i] for i in train_items for examples in sets]
    test, choices = [], []
    for examples in sets:
        labels = tuple(sorted({e.answer for e in examples}))  # type: ignore[type-var]
        for i in test_items:
            test.append(examples[i])
            choices.append(labels)
    keep = subsample_indices(len(test), max_test, seed)
    return DownstreamTask(
        name=(name or _common_prefix(names)) + ("/validation" if validation else ""),
        kind="label",
        train=subsample(train, max_train, seed),
        test=tuple(test[i] for i in keep),
        choices=tuple(choices[i] for i in keep),
        template=PLAIN,
    )


def _common_prefix(names: Sequence[str]) -> str:
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("_") or "+".join(names)


def gsm8k_task(
    data_dir: DataDir = None,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> DownstreamTask:
    """GSM8K (grade-school maths) from the data folder, scored by the final number."""
    return DownstreamTask(
        name="gsm8k",
        kind="number",
        train=subsample(load_gsm8k("train", data_dir), max_train, seed),
        test=(test := subsample(load_gsm8k("test", data_dir), max_test, seed)),
        choices=tuple(() for _ in test),
        template=ALPACA,
    )
