"""T0 template tasks as LoRAHub's unseen targets, run through the same protocol as BBH.

LoRAHub's paper scores composition on tasks no module was trained on (BIG-Bench Hard). A T0
classification template left out of the module library is such a task for a model too small to
answer BBH's questions: `T0Target` gives it `BBHTask`'s interface (ADAPT split, zero-shot and
in-context prompts, prompt/target pairs), so `slim_jax.lorahub.run_bbh_task` runs it unchanged:

- Split: the template's fixed stratified train/test split (`load_t0_task`); the K ADAPT examples
  are drawn from the train part as the reference draws BBH's (`adapt_indices`: seed 42,
  shuffle, first K); the test items are never drawn from.
- Prompt: the template's own prompt (it ends in a newline, after which the label follows, as the
  modules were trained); in-context: the K examples `prompt label` in front, blank lines between.
- Validation (for pilots): `validation=True` scores on the train part's items outside the ADAPT
  set instead of the test items, so settings are chosen without reading the test split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slim_jax.data.bbh import ADAPT_K, ADAPT_SEED, BBHExample, adapt_indices
from slim_jax.data.examples import Example
from slim_jax.data.sets import DataDir
from slim_jax.data.t0_tasks import load_t0_task
from slim_jax.errors import ConfigError


def t0_icl_prompt(shots: Sequence[BBHExample], question: str) -> str:
    """The in-context prompt: each shot's prompt followed by its label, then the question.

    >>> t0_icl_prompt([BBHExample("Is it good?\\n", "Yes")], "Is it bad?\\n")
    'Is it good?\\nYes\\n\\nIs it bad?\\n'
    """
    return "".join(f"{s.input}{s.target}\n\n" for s in shots) + question


@dataclass(frozen=True)
class T0Target:
    """A T0 classification template as an unseen LoRAHub target (module docstring).

    Attributes:
      name: the template task.
      train: the split's train part, in file order (the ADAPT examples come from it).
      test: the split's test part, in file order.
      validation: score on `train` minus the ADAPT examples instead of `test`.
    """

    name: str
    train: tuple[BBHExample, ...]
    test: tuple[BBHExample, ...]
    validation: bool = False

    def prompt(self, question: str) -> str:
        """The zero-shot prompt: the template's prompt as it is."""
        return question

    def icl_prompt(self, shots: Sequence[BBHExample], question: str) -> str:
        """The in-context prompt of `question` with `shots` in front (`t0_icl_prompt`)."""
        return t0_icl_prompt(shots, question)

    def adapt_split(
        self, k: int = ADAPT_K, seed: int = ADAPT_SEED
    ) -> tuple[tuple[BBHExample, ...], tuple[BBHExample, ...]]:
        """`(adapt, scored)`: K examples of the train part (`adapt_indices`, in draw order) and
        the test part (with `validation`: the rest of the train part), disjoint.

        Raises:
          ConfigError: `k` larger than the train part (naming both).
        """
        try:
            chosen = adapt_indices(len(self.train), k, seed)
        except ConfigError as err:
            raise ConfigError(f"T0 target {self.name!r}: {err}") from None
        taken = set(chosen)
        adapt = tuple(self.train[i] for i in chosen)
        if not self.validation:
            return adapt, self.test
        return adapt, tuple(e for i, e in enumerate(self.train) if i not in taken)

    def as_examples(
        self, examples: Iterable[BBHExample], shots: Sequence[BBHExample] = ()
    ) -> list[Example]:
        """Prompt/target pairs for tokenisation, as `BBHTask.as_examples` makes them."""
        return [Example(self.icl_prompt(shots, e.input) if shots else self.prompt(e.input),
                        e.target, answer=e.target) for e in examples]

    def majority_score(self, k: int = ADAPT_K, seed: int = ADAPT_SEED,
                       limit: int | None = None) -> float:
        """Exact match x 100 of always answering the train part's most frequent label, on the
        items `adapt_split` scores (the first `limit` of them, as the protocol's
        `max_test_examples` takes them): the chance line a method must beat."""
        top = max(Counter(e.target for e in self.train).items(), key=lambda kv: (kv[1], kv[0]))
        scored = self.adapt_split(k, seed)[1][:limit]
        return 100.0 * sum(e.target == top[0] for e in scored) / max(len(scored), 1)


def load_t0_target(name: str, data_dir: DataDir = None, *, validation: bool = False,
                   test_fraction: float = 0.25, seed: int = 0) -> T0Target:
    """The T0 classification template `name` as a `T0Target` (split by `load_t0_task`).

    Raises:
      DataError: unknown name, or a template that is not a classification task with at least
        two examples per label (`load_t0_task` says which).

    >>> import json, pathlib, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     root = pathlib.Path(d, "t0_templates"); root.mkdir()
    ...     rows = [{"prompt": f"Review {i}. Good?\\n", "completion": y + "<|endoftext|>"}
    ...             for i, y in enumerate(["Yes", "No"] * 8)]
    ...     _ = (root / "toy.jsonl").write_text("\\n".join(json.dumps(r) for r in rows))
    ...     target = load_t0_target("toy", d)
    >>> adapt, test = target.adapt_split(k=3)
    >>> len(target.train), len(adapt), len(test), target.prompt(test[0].input)
    (12, 3, 4, 'Review 0. Good?\\n')
    """
    task = load_t0_task(name, data_dir, test_fraction=test_fraction, seed=seed)

    def pairs(examples: Iterable[Example]) -> tuple[BBHExample, ...]:
        return tuple(BBHExample(e.instruction, e.answer or e.response) for e in examples)

    return T0Target(name, pairs(task.train), pairs(task.test), validation=validation)
