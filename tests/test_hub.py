"""Hub / local-path resolution (`slim_jax.hub`)."""

from __future__ import annotations

import pytest

from slim_jax import hub
from slim_jax.errors import CheckpointError


def test_resolve_local_dir_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(CheckpointError, match=r"lacks tokenizer\.json.*holds: config\.json"):
        hub.resolve_model_dir(tmp_path, required=("config.json", "tokenizer.json"))
    with pytest.raises(CheckpointError, match="is a file; expected a model directory"):
        hub.resolve_model_dir(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no directory .*expected an existing local"):
        hub.resolve_model_dir(tmp_path / "nested" / "missing")


def test_hub_id_offline_names_the_missing_files(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'someone/tiny-llama'.*offline.*Missing files: "
                                              r"config\.json, model\.safetensors"):
        hub.resolve_model_dir("someone/tiny-llama", required=("config.json", "model.safetensors"))
