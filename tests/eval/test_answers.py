"""Reading answers out of generated text."""

from __future__ import annotations

import pytest

from slim_jax.errors import DataError
from slim_jax.eval import (
    choices_from_instruction,
    extract_choice,
    extract_label,
    extract_number,
    same_number,
)

AG = ("Business", "Science and technology")
RECOMMEND = ("Business executive", "Scientist")


@pytest.mark.parametrize(("text", "labels", "expected"), [
    (" Science and technology", AG, "Science and technology"),
    ("science  and\ntechnology.", AG, "Science and technology"),
    (" Business executive", ("Business", "Business executive"), "Business executive"),
    (" Business", ("Business", "Business executive"), "Business"),
    ("It is about business, not science", ("Science", "Business"), "Business"),
    (" Scientist", RECOMMEND, "Scientist"),
    (" Once upon a time", AG, None),
    ("", AG, None),
])
def test_extract_label(text, labels, expected):
    assert extract_label(text, labels) == expected


@pytest.mark.parametrize(("text", "choices", "expected"), [
    ("the correct answer is answer3", ("answer1", "answer2", "answer3"), "answer3"),
    ("The correct answer is Answer2.", ("answer1", "answer2"), "answer2"),
    ("answer1 looks wrong; the correct answer is answer2", ("answer1", "answer2"), "answer2"),
    ("I pick solution2 over solution1", ("solution1", "solution2"), "solution2"),
    ("answer10 vs answer1", ("answer1", "answer10"), "answer10"),
    ("the correct answer is", ("true", "false"), None),
    ("nothing here", ("option1", "option2"), None),
])
def test_extract_choice(text, choices, expected):
    assert extract_choice(text, choices) == expected


def test_choices_from_instruction_reads_the_last_format_line():
    text = ("Please choose the correct answer to fill in the blank: _ won.\n\nOption1: A "
            "Option2: B Answer format: option1/option2")
    assert choices_from_instruction(text) == ("option1", "option2")
    with pytest.raises(DataError, match="Answer format"):
        choices_from_instruction("no format line")


@pytest.mark.parametrize(("text", "expected"), [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("Total: 1,234.", "1234"),
    ("It costs -2.5 dollars", "-2.5"),
    ("#### 18.0", "18"),
    ("no number", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_same_number_compares_values():
    assert same_number("18", "18.00") and same_number("1234", "1,234")
    assert not same_number("17", "18") and not same_number(None, "18")
