"""`--model.remat` / `--model.scan-layers` reach the base model's config in both LoRAHub commands
(`lorahub_bbh`, `train_lora_modules`: one check, `experiments.base_model.model_overrides`),
checked before any work."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import base_model, lorahub_bbh, train_lora_modules
from experiments.base_model import model_overrides
from experiments.presets.common import ModelSpec
from slim_jax.errors import DataError

TINY_T5 = {"model_type": "t5", "vocab_size": 32, "d_model": 8, "d_kv": 4, "d_ff": 16,
           "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
           "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}


@pytest.fixture
def t5_folder(tmp_path):
    """A model folder holding only a T5 `config.json`: all the check reads."""
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_T5))
    return folder


def test_remat_and_scan_reach_the_t5_config(t5_folder):
    spec = lambda **model: ModelSpec(path=str(t5_folder), **model)
    assert model_overrides(spec(), None) == {}
    assert model_overrides(spec(remat="full"), None) == {"remat": "full"}
    assert model_overrides(spec(remat="dots_saveable", scan_layers=True), None) == {
        "remat": "dots_saveable", "scan_layers": True}


def test_train_lora_modules_loads_the_base_with_the_settings(t5_folder, tmp_path, monkeypatch,
                                                             shared_data):
    seen = {}

    def load_base(path, data_dir, **settings):  # where the base would be read: stop there
        seen.update(settings, path=path)
        raise DataError("stopped before loading")

    monkeypatch.setattr(train_lora_modules, "load_base", load_base)
    argv = ["--model.path", str(t5_folder), "--model.remat", "full", "--model.scan-layers",
            "true", "--upstream.num-modules", "1", "--out", str(tmp_path / "out"),
            "--compilation-cache", "none"]
    assert train_lora_modules.main(argv) == 2
    assert seen["path"] == str(t5_folder)
    assert (seen["remat"], seen["scan_layers"]) == ("full", True)
    assert not (tmp_path / "out").exists()  # the base is loaded before the folder is written


@dataclasses.dataclass(frozen=True)
class _NoScanConfig:
    """A family's config with rematerialisation but no layer scan."""

    remat: str = "none"


@pytest.mark.parametrize("command", [lorahub_bbh, train_lora_modules])
def test_a_setting_the_family_lacks_is_one_line_before_any_work(command, t5_folder, tmp_path,
                                                                monkeypatch, capsys,
                                                                shared_data):
    monkeypatch.setattr(base_model, "config_from_hf", lambda hf, source=None: _NoScanConfig())
    out = tmp_path / "out"
    args = ["--model.path", str(t5_folder), "--out", str(out), "--compilation-cache", "none"]
    if command is lorahub_bbh:
        args += ["--bbh.tasks", "navigate"]
    assert command.main([*args, "--model.scan-layers", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--model.scan-layers is not available for this model family" in err
    assert not out.exists()


def test_an_unknown_remat_policy_is_one_line(capsys):
    assert lorahub_bbh.main(["--preset", "flan-t5-large", "--model.remat", "everything"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model.remat must be one of none, full" in err
