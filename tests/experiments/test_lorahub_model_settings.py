"""`--model.remat` / `--model.scan-layers` reach LoRAHub's base model config, checked first."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.lorahub_bbh import main, model_overrides
from experiments.presets.common import ModelSpec
from experiments.presets.lorahub import PRESETS
from slim_jax.errors import ConfigError
from slim_jax.models.t5_config import T5Config

TINY_T5 = {"model_type": "t5", "vocab_size": 32, "d_model": 8, "d_kv": 4, "d_ff": 16,
           "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
           "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}


def _config(folder, **model):
    spec = ModelSpec(path=str(folder), **model)
    return dataclasses.replace(PRESETS["flan-t5-large"][0], model=spec)


def test_remat_and_scan_reach_the_t5_config_when_it_has_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_T5))
    assert model_overrides(_config(tmp_path)) == {}
    assert model_overrides(_config(tmp_path, remat="full")) == {"remat": "full"}
    scanned = _config(tmp_path, scan_layers=True)
    if "scan_layers" in {f.name for f in dataclasses.fields(T5Config)}:  # T5 layer scan built
        assert model_overrides(scanned) == {"scan_layers": True}
    else:  # not yet: one line naming the setting, before any module is trained
        with pytest.raises(ConfigError, match="scan_layers is not available for this model"):
            model_overrides(scanned)


def test_an_unknown_remat_policy_is_one_line(capsys):
    assert main(["--preset", "flan-t5-large", "--model.remat", "everything"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model.remat must be one of none, full" in err
