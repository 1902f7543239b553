"""The shared folder's sets load as examples; bad names and records get named errors."""

from __future__ import annotations

import json

import pytest

from slim_jax.data import (
    ALPACA,
    PLAIN,
    Example,
    PromptTemplate,
    commonsense_names,
    gsm8k_final_answer,
    load_commonsense,
    load_gsm8k,
    load_t0_template,
)
from slim_jax.errors import ConfigError, DataError


def test_commonsense_sets(shared_data):
    assert {"boolq", "piqa", "social_i_qa", "openbookqa"} <= set(commonsense_names(shared_data))
    boolq = load_commonsense("boolq", "train", shared_data)
    assert len(boolq) == 9427
    assert {e.answer for e in boolq} == {"true", "false"}
    # The output states the answer as the data's format promises: "the correct answer is <answer>".
    assert all(e.response == f"the correct answer is {e.answer}" for e in boolq[:50])


def test_commonsense_unknown_set_and_split(shared_data):
    with pytest.raises(DataError, match=r"no commonsense set 'boolqq'.*present: .*'boolq'"):
        load_commonsense("boolqq", "train", shared_data)
    with pytest.raises(DataError, match="piqa' has no split 'train'; present: \\['test'\\]"):
        load_commonsense("piqa", "train", shared_data)


def test_gsm8k(shared_data):
    train, test = load_gsm8k("train", shared_data), load_gsm8k("test", shared_data)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].answer == "18"  # Janet's ducks: 16 - 3 - 4 = 9 eggs at $2
    assert all(e.answer and "####" not in e.answer for e in train)


def test_gsm8k_missing_final_answer_names_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "4"}]
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"train\.jsonl line 2: answer has no final answer"):
        load_gsm8k("train", tmp_path)
    assert gsm8k_final_answer("x\n#### 1,234 ") == "1,234"


def test_t0_template_strips_end_marker(shared_data):
    examples = load_t0_template("ag_news_classify", shared_data)
    assert len(examples) == 200
    assert {e.response for e in examples} == {"Science and technology", "Business"}
    assert all(e.answer == e.response for e in examples)


def test_t0_unknown_and_empty(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"no T0 template task 'ag_news_clasify'.*close names: "
                                        r"\['ag_news_classify'"):
        load_t0_template("ag_news_clasify", shared_data)
    (tmp_path / "t0_templates").mkdir()
    (tmp_path / "t0_templates" / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no records"):
        load_t0_template("empty", tmp_path)


def test_no_data_folder_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SLIM_JAX_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="SLIM_JAX_DATA_DIR"):
        load_gsm8k()


def test_templates_render():
    example = Example("Is it sunny?", "the correct answer is true", answer="true")
    assert PLAIN.render(example) == ("Is it sunny?", "the correct answer is true")
    prompt = ALPACA.render(example)[0]
    assert prompt.endswith("### Instruction:\nIs it sunny?\n\n### Response:\n")
    with_input = ALPACA.render(Example("Add.", "3", input="1 and 2"))[0]
    assert "### Input:\n1 and 2\n\n### Response:\n" in with_input


@pytest.mark.parametrize("kwargs", [{"prompt": "{question}"}, {"response": "{answer}"},
                                    {"prompt_with_input": "{instruction} {"}])
def test_template_bad_fields(kwargs):
    with pytest.raises(ConfigError, match="template"):
        PromptTemplate(**kwargs)
