"""`load_model`: a llama2.c file with its tokenizer, dtype options, and every bad path named.
(Hugging Face Llama and T5 directories load through it in tests/test_generate_cli.py.)"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import pytest

from slim_jax.errors import CheckpointError, ConfigError
from slim_jax.models.llama import Llama
from slim_jax.models.llama2c import Llama2cTokenizer
from slim_jax.models.loading import load_model

STORY = "tinystories260k"


def test_llama2c_file_loads_with_the_tokenizer_beside_it(shared_data):
    model, tokenizer = load_model(shared_data / STORY / "checkpoint_v1.bin", dtype="bfloat16")
    assert isinstance(model, Llama) and isinstance(tokenizer, Llama2cTokenizer)
    assert model.config.num_kv_heads == 4 and tokenizer.vocab_size == 512
    assert model.embed_tokens.embedding.dtype == jnp.bfloat16  # param_dtype follows dtype
    model, _ = load_model(shared_data / STORY / "checkpoint_v1.bin", dtype="bfloat16",
                          param_dtype="float32")
    assert model.embed_tokens.embedding.dtype == jnp.float32
    assert model.config.dtype == "bfloat16"


def test_llama2c_without_its_tokenizer_is_named(shared_data, tmp_path):
    shutil.copy(shared_data / STORY / "checkpoint_v1.bin", tmp_path / "story.bin")
    with pytest.raises(CheckpointError, match=r"no tokenizer\.bin beside the llama2\.c "
                                              r"checkpoint .*story\.bin: name its tokenizer"):
        load_model(tmp_path / "story.bin")
    model, tokenizer = load_model(tmp_path / "story.bin",
                                  tokenizer=shared_data / STORY / "tokenizer.bin")
    assert tokenizer.encode("Lily", add_bos=True)[0] == 1 and model.config.vocab_size == 512


def test_bad_paths_are_named(shared_data, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds no config\.json.*for a llama2\.c "
                                              r"checkpoint pass the file itself \(e\.g\. .*"
                                              r"checkpoint_v1\.bin\)"):
        load_model(shared_data / STORY)
    with pytest.raises(CheckpointError, match=r"no directory '.*missing': expected an existing"):
        load_model(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch zip archive")
    with pytest.raises(CheckpointError, match=r"is a PyTorch pickle, not a llama2\.c checkpoint"):
        load_model(tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt2' is not implemented; "
                                          "slim_jax loads llama, mt5, qwen2, t5"):
        load_model(tmp_path)
