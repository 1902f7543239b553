"""Commonsense sets: the hub converters write exactly the data folder's LLM-Adapters format."""

from __future__ import annotations

import pytest

from slim_jax.data import Records, load_commonsense
from slim_jax.errors import DataError
from slim_jax.eval import commonsense, commonsense_task, load_commonsense_split


def test_siqa_converter_matches_the_local_file(shared_data):
    local = load_commonsense("social_i_qa", "test", shared_data)[0]
    row = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
           "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
           "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
    assert commonsense._siqa(row, "row 0") == local


def test_winogrande_converter_matches_the_local_file(shared_data):
    local = load_commonsense("winogrande", "test", shared_data)[0]
    row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier "
                       "cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert commonsense._winogrande(row, "row 0") == local


def test_other_converters_and_bad_rows():
    csqa = commonsense._csqa({"question": "Where?", "answerKey": "C", "choices": {
        "label": list("ABCDE"), "text": ["a", "b", "c", "d", "e"]}}, "row 1")
    assert csqa.answer == "answer3" and csqa.instruction.endswith("answer1/answer2/answer3/"
                                                                   "answer4/answer5")
    hella = commonsense._hellaswag({"activity_label": "Cooking", "ctx": "He stirs",
                                    "endings": ["w", "x", "y", "z"], "label": "0"}, "row 2")
    assert hella.instruction.startswith("Please choose the correct ending to complete the given "
                                        "sentence: Cooking: He stirs")
    assert hella.response == "the correct answer is ending1"
    mmlu = commonsense._mmlu({"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1},
                             "row 3")
    assert mmlu.answer == "answer2"
    with pytest.raises(DataError, match="row 4: record has no field 'label'"):
        commonsense._siqa({"context": "", "question": "", "answerA": "", "answerB": "",
                           "answerC": ""}, "row 4")
    with pytest.raises(DataError, match="outside"):
        commonsense._mmlu({"question": "q", "choices": ["a"], "answer": 3}, "row 5")


def test_missing_local_split_falls_back_to_the_hub(shared_data, monkeypatch):
    calls = []

    def fake_hub(name, required, *, split, config=None):
        calls.append((name, split, config))
        row = {"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b",
               "answerC": "c", "label": "2"}
        return Records((row,), name, "row", (0,))

    monkeypatch.setattr(commonsense, "read_hub", fake_hub)
    # SIQA has only a test split in the data folder: train comes from the hub, test stays local.
    train = load_commonsense_split("social_i_qa", "train", shared_data)
    assert calls == [("allenai/social_i_qa", "train", None)] and train[0].answer == "answer2"
    task = commonsense_task(["social_i_qa", "boolq"], shared_data, max_test=5)
    assert len(task.test) == 10 and task.choices[-1] == ("true", "false")
    with pytest.raises(DataError, match="no hub source"):
        load_commonsense_split("piqa", "train", shared_data)
