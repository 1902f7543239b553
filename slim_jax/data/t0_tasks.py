"""T0 template files as classification tasks: prompt, label, label set, fixed train/test split.

A template whose completions take a few distinct values (sentiment, topic, yes/no) is a
classification task whose labels are those values. The shared files hold about 200 examples each,
taken from the head of each source split: some (all `rotten_tomatoes_*`, `imdb_*`, `dbpedia_14_*`)
therefore carry a single label and cannot be learned; `classification_candidates` lists the ones
that can, with their label counts.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from slim_jax.data.examples import Example
from slim_jax.data.sets import DataDir, load_t0_template, t0_template_names
from slim_jax.errors import ConfigError, DataError


@dataclass(frozen=True)
class LabelStats:
    """The label distribution of one template file.

    Attributes:
      name: the template task.
      counts: examples per label, most frequent first.
    """

    name: str
    counts: tuple[tuple[str, int], ...]

    @property
    def num_examples(self) -> int:
        return sum(c for _, c in self.counts)

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def majority_share(self) -> float:
        """Accuracy of always answering the most frequent label (the chance line to beat)."""
        return self.counts[0][1] / self.num_examples if self.counts else 0.0


@dataclass(frozen=True)
class ClassificationTask:
    """A classification task made from a T0 template file.

    Attributes:
      name: the template task.
      labels: the label set, sorted (the distinct completions).
      train: training examples (`answer` is the label, `response` the label text).
      test: held-out examples, disjoint from `train`, every label represented in its share.
    """

    name: str
    labels: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    def label_counts(self, split: str = "all") -> dict[str, int]:
        """Examples per label in `"train"`, `"test"` or `"all"`."""
        parts = {"train": self.train, "test": self.test, "all": self.train + self.test}
        if split not in parts:
            raise ConfigError(f"split must be one of {sorted(parts)}, got {split!r}")
        counts = Counter(e.answer for e in parts[split])
        return {label: counts[label] for label in self.labels}

    def majority_accuracy(self) -> float:
        """Test accuracy of always answering the most frequent training label."""
        train_counts = self.label_counts("train")
        top = max(self.labels, key=lambda label: (train_counts[label], label))
        return sum(e.answer == top for e in self.test) / len(self.test)


def label_stats(examples: Sequence[Example], name: str = "") -> LabelStats:
    """Label counts of examples (by `answer`), most frequent first, ties by label."""
    counts = Counter(e.answer for e in examples)
    return LabelStats(name, tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def stratified_split(
    labels: Sequence[str], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of a deterministic stratified split, each part in original order.

    For every label (in sorted order) its indices are shuffled with one `random.Random(seed)` and
    `round(test_fraction * count)` of them (at least 1, at most count - 1) go to test.

    >>> stratified_split(["a", "a", "b", "b"], 0.5, seed=0)[1].__len__()
    2
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    test: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        take = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        test.extend(members[:take])
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test_set)


def load_t0_task(
    name: str,
    data_dir: DataDir = None,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    max_classes: int = 20,
) -> ClassificationTask:
    """A T0 template file as a classification task with a deterministic stratified split.

    Args:
      name: template task, e.g. `"amazon_polarity_Is_this_review"` (file stem in `t0_templates/`).
      data_dir: the data folder (default: `slim_jax.settings.data_dir()`).
      test_fraction: share of each label held out for test.
      seed: seed of the split (`random.Random(seed)`, see `stratified_split`).
      max_classes: more distinct completions than this means a generation task, not classification.

    Raises:
      DataError: unknown name, a file with one label only or with more than `max_classes`, or a
        label with a single example (it cannot be in both train and test).

    >>> import json, pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     root = pathlib.Path(d, "t0_templates"); root.mkdir()
    ...     rows = [{"prompt": f"Review {i}. Is it good?\\n", "completion": y + "<|endoftext|>"}
    ...             for i, y in enumerate(["Yes", "No"] * 4)]
    ...     _ = (root / "toy.jsonl").write_text("\\n".join(json.dumps(r) for r in rows))
    ...     task = load_t0_task("toy", d, test_fraction=0.25)
    >>> task.labels, len(task.train), len(task.test), task.label_counts("test")
    (('No', 'Yes'), 6, 2, {'No': 1, 'Yes': 1})
    """
    examples = load_t0_template(name, data_dir)
    stats = label_stats(examples, name)
    if stats.num_classes < 2:
        raise DataError(f"T0 template {name!r} has a single label {stats.counts[0][0]!r} for all "
                        f"{stats.num_examples} examples: nothing to learn; see "
                        "classification_candidates() for templates with several labels")
    if stats.num_classes > max_classes:
        raise DataError(f"T0 template {name!r} has {stats.num_classes} distinct completions, more "
                        f"than max_classes={max_classes}: a generation task, not classification")
    singles = [label for label, count in stats.counts if count < 2]
    if singles:
        raise DataError(f"T0 template {name!r}: labels {singles} have one example only; a "
                        "stratified train/test split needs at least 2 per label")
    labels = [e.answer for e in examples]
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return ClassificationTask(
        name=name,
        labels=tuple(sorted(set(labels))),
        train=tuple(examples[i] for i in train_idx),
        test=tuple(examples[i] for i in test_idx),
    )


def classification_candidates(
    data_dir: DataDir = None,
    *,
    min_examples: int = 100,
    max_classes: int = 20,
    min_per_label: int = 5,
) -> list[LabelStats]:
    """Template tasks usable as classification: 2..max_classes labels, each with at least
    `min_per_label` examples (which rules out generation templates whose outputs merely repeat),
    and at least `min_examples` examples in all.

    Sorted by majority share, most balanced first (the chance line furthest from 100%).
    """
    found = []
    for name in t0_template_names(data_dir):
        try:
            examples = load_t0_template(name, data_dir)
        except DataError:  # empty files exist in the shared folder
            continue
        stats = label_stats(examples, name)
        if (2 <= stats.num_classes <= max_classes and stats.num_examples >= min_examples
                and stats.counts[-1][1] >= min_per_label):
            found.append(stats)
    return sorted(found, key=lambda s: (s.majority_share, s.name))
