"""Records from JSON / JSONL / hub: every malformed record is named by file and line or index."""

from __future__ import annotations

import json

import pytest

from slim_jax.data import load_records, read_json, read_jsonl
from slim_jax.errors import DataError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rows_and_positions(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": "1", "a": "x"}, "", {"q": "2", "a": "y"}])
    records = read_jsonl(path, ("q", "a"))
    assert [r["q"] for r in records.rows] == ["1", "2"]
    assert records.where(1) == f"{path} line 3"  # the blank line 2 is skipped, lines still counted


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "1", "a": "x"}, {"q": "2", "a": "y"},
                                                {"q": "3"}])
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: record has no field 'a'"):
        read_jsonl(path, ("q", "a"))


def test_jsonl_invalid_json_names_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"q": "1"}, '{"q": "2"'])
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: not valid JSON"):
        read_jsonl(path, ("q",))


def test_jsonl_control_character_reads_once(tmp_path):
    path = tmp_path / "tab.jsonl"
    path.write_text('{"q": "a\tb"}\n')
    with pytest.raises(DataError, match=r"line 1: not valid JSON \(Invalid control character "
                                        r"at column 9\)") as info:
        read_jsonl(path, ("q",))
    assert " at at " not in str(info.value)


def test_json_list_missing_field_names_index(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"set\.json index 1: record has no field 'output'"):
        read_json(path, ("instruction", "output"))


def test_field_must_be_a_string(tmp_path):
    path = write_jsonl(tmp_path / "typed.jsonl", [{"q": 3}])
    with pytest.raises(DataError, match=r"typed\.jsonl line 1: field 'q' must be a string, "
                                        "got int"):
        read_jsonl(path, ("q",))


def test_record_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([["not", "an", "object"]]))
    with pytest.raises(DataError, match=r"list\.json index 0: expected a JSON object"):
        read_json(path, ("q",))


def test_json_root_must_be_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"q": "1"}))
    with pytest.raises(DataError, match="expected a JSON list of records"):
        read_json(path, ("q",))


def test_load_records_dispatches_on_suffix(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "1"}])
    (tmp_path / "b.json").write_text(json.dumps([{"q": "1"}, {"q": "2"}]))
    assert len(load_records(tmp_path / "a.jsonl", ("q",))) == 1
    assert len(load_records(str(tmp_path / "b.json"), ("q",))) == 2
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl", ("q",))
    (tmp_path / "c.csv").write_text("q\n1\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_records(tmp_path / "c.csv")


def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hub dataset 'lukaemon/bbh' config 'snarks'.*offline"):
        load_records("lukaemon/bbh", ("input", "target"), split="test", config="snarks")


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'imdb' on the Hub")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'imdb'.*ConnectionError"):
        load_records("imdb", ("text",))


def test_hub_records_are_validated_by_row(monkeypatch):
    import datasets

    rows = [{"text": "good", "label": "pos"}, {"text": "bad"}]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows)
    assert len(load_records("toy", ("text",))) == 2
    with pytest.raises(DataError, match=r"hub dataset 'toy' split 'train' row 1: .*no field "
                                        "'label'"):
        load_records("toy", ("text", "label"))
