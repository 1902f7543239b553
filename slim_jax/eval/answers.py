"""Reading the answer out of generated text: class labels, commonsense choices, numbers.

Three answer formats occur in the project's data:
- classification (T0 templates): the response *is* the label string (`Business`, `Positive`);
- commonsense (LLM-Adapters): the response reads `the correct answer is <choice>`, where the
  choices are listed in the instruction's last line, `Answer format: answer1/answer2/...`;
- GSM8K: a worked solution whose final answer is a number.

Matching is case-insensitive and ignores surrounding whitespace and a trailing full stop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slim_jax.errors import DataError

ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+?)\s*$", re.IGNORECASE | re.MULTILINE)
CORRECT_ANSWER = re.compile(r"the correct answer is\s*", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing full stop.

    >>> normalize("  Science and\\n Technology. ")
    'science and technology'
    """
    return " ".join(text.lower().split()).rstrip(".").strip()


def choices_from_instruction(instruction: str) -> tuple[str, ...]:
    """The choices an LLM-Adapters instruction offers, from its `Answer format: a/b/c` line.

    Raises:
      DataError: the instruction has no `Answer format:` line.

    >>> choices_from_instruction("Pick one.\\n\\nAnswer format: answer1/answer2/answer3")
    ('answer1', 'answer2', 'answer3')
    """
    found = ANSWER_FORMAT.findall(instruction)
    if not found:
        raise DataError(f"instruction has no 'Answer format: a/b/...' line to read the choices "
                        f"from: ...{instruction[-120:]!r}")
    return tuple(c.strip() for c in found[-1].split("/") if c.strip())


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generated text gives: the label it starts with (longest first, so `Business
    executive` beats `Business`), else the label mentioned earliest, else None.

    >>> extract_label(" Science and technology<|end|>", ["Business", "Science and technology"])
    'Science and technology'
    >>> extract_label("I think it is business.", ["Business", "Science"]), extract_label("?", ["a"])
    ('Business', None)
    """
    said = normalize(text)
    by_length = sorted(labels, key=lambda label: -len(label))
    for label in by_length:
        if said.startswith(normalize(label)):
            return label
    hits = []
    for label in by_length:
        match = re.search(r"\b" + re.escape(normalize(label)) + r"\b", said)
        if match:
            hits.append((match.start(), -len(label), label))
    return min(hits)[2] if hits else None


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice a commonsense response names: the one after `the correct answer is`, else the
    first choice mentioned (LLM-Adapters' evaluation takes the first match), else None.

    >>> extract_choice("the correct answer is answer2", ["answer1", "answer2"])
    'answer2'
    >>> extract_choice("answer1 or answer2? the correct answer is false", ["true", "false"])
    'false'
    """
    said = normalize(text)
    alternatives = "|".join(re.escape(normalize(c)) for c in sorted(choices, key=lambda c: -len(c)))
    pattern = re.compile(r"\b(" + alternatives + r")\b")
    by_norm = {normalize(c): c for c in choices}
    marker = CORRECT_ANSWER.search(said)
    if marker:
        match = pattern.match(said, marker.end())
        if match:
            return by_norm[match.group(1)]
    match = pattern.search(said)
    return by_norm[match.group(1)] if match else None


def extract_number(text: str) -> str | None:
    """The final number of a worked solution: after the last `#### ` if present, else the last
    number in the text; commas dropped, trailing `.0` removed.

    >>> extract_number("3 + 4 = 7 apples, so 1,200 - 7 = 1,193.\\n#### 1,193")
    '1193'
    >>> extract_number("no digits") is None
    True
    """
    tail = text.rpartition("####")[2] if "####" in text else text
    numbers = NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def same_number(predicted: str | None, answer: str) -> bool:
    """Whether an extracted number equals the reference answer (numerically when both parse).

    >>> same_number("18", "18.00"), same_number(None, "3"), same_number("7", "8")
    (True, False, False)
    """
    if predicted is None:
        return False
    reference = answer.replace(",", "").strip()
    try:
        return float(predicted) == float(reference)
    except ValueError:
        return predicted == reference
