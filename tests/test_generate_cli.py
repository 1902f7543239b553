"""`python -m slim_jax.generate`: the printed text equals the library's, every model kind and
adapter format loads, and bad input is one line on stderr with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

import slim_jax.generate as generate_cli
from slim_jax.errors import ConfigError
from slim_jax.generate import PROG, check_positions, decode_state_bytes, main
from slim_jax.models.adapter_io import save_adapter_checkpoint
from slim_jax.models.generate import generate
from slim_jax.models.llama import Llama
from slim_jax.models.llama2c import load_llama2c
from slim_jax.models.peft_io import load_peft, save_peft
from slim_jax.models.t5 import T5
from slim_jax.nn import LoRAConfig, SlimConfig, adapted_layers, inference_view, inject
from slim_jax.tokenizer import HFTokenizer

REPO = Path(__file__).resolve().parents[1]
STORY = "tinystories260k/checkpoint_v1.bin"
VOCAB = 64
PROMPT = "w5 w9 w13 w17"


def _save_word_tokenizer(folder: Path, specials: dict[str, str]) -> None:
    """A word-level tokenizer: the special tokens first, then words w<i> up to VOCAB."""
    vocab = {token: i for i, token in enumerate(specials.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=specials["unk_token"]))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(folder)


def _randomise(model: torch.nn.Module, seed: int, scale: float, *, only: str = "") -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(torch.randn_like(p) * scale)


def _never_eos(model: torch.nn.Module, eos_id: int) -> None:
    """Zero the head's EOS row: its logit is 0, below the largest of the other (random) logits,
    so greedy texts run to max_new_tokens and comparisons compare whole texts."""
    with torch.no_grad():
        model.lm_head.weight[eos_id].zero_()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama (GQA) with a word tokenizer, and a peft LoRA adapter trained on it."""
    root = tmp_path_factory.mktemp("cli_llama")
    base, adapter = root / "base", root / "adapter"
    torch.manual_seed(0)  # transformers and peft initialise from torch's global generator
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    _randomise(model, 0, 0.2)
    _never_eos(model, config.eos_token_id)
    model.save_pretrained(base)
    _save_word_tokenizer(base, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                               peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomise(lora, 1, 1.0, only="lora_")
    lora.save_pretrained(adapter)
    return base, adapter


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory) -> Path:
    """A tiny random T5 v1.1 (gated-GELU, untied head) with a word tokenizer."""
    folder = tmp_path_factory.mktemp("cli_t5")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))  # varied answers
    _randomise(model, 0, 0.3)
    _never_eos(model, config.eos_token_id)
    model.save_pretrained(folder)
    _save_word_tokenizer(folder, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    return folder


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ generated text


def test_tinystories_writes_a_story_through_the_module(shared_data):
    """The real llama2.c model, run as `python -m slim_jax.generate` from an empty prompt."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("SLIM_JAX_DATA_DIR", None)  # found through --data-dir alone
    done = subprocess.run(
        [sys.executable, "-m", "slim_jax.generate", STORY, "--data-dir", str(shared_data),
         "--max-new-tokens", "48"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    story = done.stdout
    assert story.startswith("Once upon a time") and "Lily" in story
    model, tokenizer = load_llama2c(shared_data / STORY)
    expected = generate(model, [""], tokenizer=tokenizer, max_new_tokens=48).texts[0]
    assert story == expected + "\n"  # the text and nothing else


def test_sampling_settings_reach_the_sampler(shared_data, capsys):
    args = [shared_data / STORY, "--prompt", "Lily and Tom", "--max-new-tokens", "24",
            "--temperature", "0.9", "--top-p", "0.9"]
    code, seed1, err = _cli(capsys, *args, "--seed", "1")
    assert (code, err) == (0, "")
    model, tokenizer = load_llama2c(shared_data / STORY)
    expected = generate(model, ["Lily and Tom"], tokenizer=tokenizer, max_new_tokens=24,
                        temperature=0.9, top_p=0.9, key=jax.random.key(1)).texts[0]
    assert seed1 == expected + "\n"
    assert _cli(capsys, *args, "--seed", "2")[1] != seed1


def test_hf_llama_with_a_peft_adapter_matches_the_library(hf_llama, capsys):
    base, adapter = hf_llama
    code, out, err = _cli(capsys, base, "--adapter", adapter, "--prompt", PROMPT,
                          "--max-new-tokens", "12")
    assert (code, err) == (0, "")  # the adapter records this base: no warning
    tokenizer = HFTokenizer(base)
    model = Llama.from_pretrained(base)
    plain = generate(model, [PROMPT], tokenizer=tokenizer, max_new_tokens=12)
    load_peft(model, adapter)
    adapted = generate(model, [PROMPT], tokenizer=tokenizer, max_new_tokens=12)
    assert len(adapted.tokens[0]) == 12  # never EOS: the whole length is compared
    assert adapted.texts != plain.texts  # the adapter shows in the text
    assert out == adapted.texts[0] + "\n"


def test_slim_jax_checkpoint_adapter_matches_the_library(hf_llama, tmp_path, capsys):
    base, _ = hf_llama
    model = Llama.from_pretrained(base)
    inject(model, r"layers/1/mlp/up_proj$", SlimConfig(num_lora_experts=2, num_identity_experts=1,
                                                     top_k=2, rank=2, num_clusters=2),
           rngs=nnx.Rngs(1))
    inject(model, r"q_proj$", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    normal = lambda var: jnp.asarray(rng.normal(size=var.shape), jnp.float32)
    for path, layer in adapted_layers(model).items():
        if path.endswith("q_proj"):
            layer.lora_b.set_value(normal(layer.lora_b))
        else:  # trained-looking experts and cluster statistics
            layer.experts_b.set_value(normal(layer.experts_b))
            layer.cluster_mean.set_value(normal(layer.cluster_mean))
            layer.cluster_var.set_value(jnp.full(layer.cluster_var.shape, 0.5))
            layer.cluster_count.set_value(jnp.int32(9))
    save_adapter_checkpoint(model, tmp_path / "checkpoints", step=5)
    tokenizer = HFTokenizer(base)
    plain = generate(Llama.from_pretrained(base), [PROMPT], tokenizer=tokenizer,
                     max_new_tokens=12)
    expected = generate(inference_view(model), [PROMPT], tokenizer=tokenizer, max_new_tokens=12)
    assert len(expected.tokens[0]) == 12 and expected.texts != plain.texts
    code, out, err = _cli(capsys, base, "--adapter", tmp_path / "checkpoints" / "5", "--prompt",
                          PROMPT, "--max-new-tokens", "12")
    assert (code, err) == (0, "")
    assert out == expected.texts[0] + "\n"


def test_t5_answers_like_the_library(hf_t5, capsys):
    code, out, err = _cli(capsys, hf_t5, "--prompt", PROMPT, "--max-new-tokens", "10")
    assert (code, err) == (0, "")
    expected = generate(T5.from_pretrained(hf_t5), [PROMPT],
                                    tokenizer=HFTokenizer(hf_t5), max_new_tokens=10)
    assert len(expected.tokens[0]) == 10 and out == expected.texts[0] + "\n"
    assert _cli(capsys, hf_t5, "--max-new-tokens", "10")[1] != out  # the input matters


# ----------------------------------------------------------------------------------- bad input


def _one_line_error(capsys, *argv) -> str:
    code, out, err = _cli(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"{PROG}: error: ")
    return err


def test_missing_model_path_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, tmp_path / "no-such-model")
    assert f"no directory '{tmp_path / 'no-such-model'}'" in err


def test_offline_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    err = _one_line_error(capsys, "someone/tiny-llama")
    assert "'someone/tiny-llama'" in err and "offline" in err and "config.json" in err


def test_bad_adapter_directories_are_one_line(hf_llama, hf_t5, tmp_path, capsys):
    base, _ = hf_llama
    err = _one_line_error(capsys, base, "--adapter", tmp_path)  # neither format
    assert "is not an adapter: expected a PEFT adapter directory" in err
    assert "slim_jax checkpoint directory" in err
    t5_lora = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(hf_t5),
                                  peft.LoraConfig(r=2, target_modules=["q", "v"]))
    t5_lora.save_pretrained(tmp_path / "t5_adapter")
    capsys.readouterr()  # transformers' progress bars
    err = _one_line_error(capsys, base, "--adapter", tmp_path / "t5_adapter")  # another model
    assert "target_modules ['q', 'v'] match no linear layer of this Llama" in err
    assert f"(the adapter was trained on '{hf_t5}'" in err


def test_usage_errors_are_one_line(hf_llama, capsys):
    base, _ = hf_llama
    err = _one_line_error(capsys, base, "--dtype", "float16")
    assert "invalid choice: 'float16'" in err
    err = _one_line_error(capsys, base, "--max-new-tokens", "0")
    assert "--max-new-tokens must be >= 1, got 0" in err
    err = _one_line_error(capsys, base, "--top-p", "1.5")
    assert "--top-p must be in (0, 1], got 1.5" in err


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _poison(file: Path, name: str, value: float) -> None:
    """Write `value` into the first entry of tensor `name` of a safetensors file."""
    import safetensors.numpy

    arrays = safetensors.numpy.load_file(file)
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = value
    safetensors.numpy.save_file(arrays, file)


def test_nonfinite_weights_are_refused_naming_the_tensor(hf_llama, tmp_path, capsys):
    base, adapter = hf_llama
    bad_base = _copy(base, tmp_path / "base")
    _poison(bad_base / "model.safetensors", "model.layers.1.mlp.up_proj.weight", np.nan)
    err = _one_line_error(capsys, bad_base, "--prompt", PROMPT)
    assert "NaN or infinite values in tensor 'model.layers.1.mlp.up_proj.weight'" in err
    bad_adapter = _copy(adapter, tmp_path / "adapter")
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    _poison(bad_adapter / "adapter_model.safetensors", name, np.inf)
    err = _one_line_error(capsys, base, "--adapter", bad_adapter, "--prompt", PROMPT)
    assert f"NaN or infinite values in tensor '{name}'" in err


def test_nonfinite_checkpoint_adapter_is_refused_naming_the_tensor(hf_llama, tmp_path, capsys):
    base, _ = hf_llama
    model = Llama.from_pretrained(base)
    inject(model, r"q_proj$", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(2))
    path, layer = sorted(adapted_layers(model).items())[0]
    layer.lora_b.set_value(layer.lora_b.get_value().at[0, 0].set(jnp.nan))
    save_adapter_checkpoint(model, tmp_path / "checkpoints", step=3)
    err = _one_line_error(capsys, base, "--adapter", tmp_path / "checkpoints", "--prompt", PROMPT)
    assert "(step 3) holds NaN or infinite values in tensor" in err
    assert f"{path}/lora_b" in err


def test_a_kv_cache_that_cannot_fit_is_refused_with_its_size(shared_data, capsys):
    err = _one_line_error(capsys, shared_data / STORY, "--max-new-tokens", "1000000000")
    assert ("--max-new-tokens 1000000000 needs a KV cache of 1.3 TB (a 16-position prompt and "
            "1000000000 new tokens)") in err


def test_a_t5_decoding_state_that_cannot_fit_is_refused_with_its_size(hf_t5, capsys,
                                                                       monkeypatch):
    """The encoder-decoder's state is measured through the family's `prefill` too: decoder
    self-attention keys and values of every new token, and the encoder's cross-attention ones."""
    monkeypatch.setattr(generate_cli, "memory_bytes", lambda: 10**6)  # a 1 MB device
    err = _one_line_error(capsys, hf_t5, "--prompt", PROMPT, "--max-new-tokens", "100000")
    # 2 decoder layers x (k, v) x 4 heads x 4 dims x 4 bytes = 256 B per new token, plus the
    # cross-attention k, v of the 16-position prompt (4 KB), its bool mask and the int32 index.
    assert (decode_state_bytes(T5.from_pretrained(hf_t5), 3, 100000)
            == 256 * 100000 + 2 * 2 * 16 * 4 * 4 * 4 + 16 + 4)
    assert ("--max-new-tokens 100000 needs a KV cache of 25.6 MB (a 16-position prompt and "
            "100000 new tokens)") in err and "lower --max-new-tokens" in err


def test_generation_beyond_the_positions_warns_for_rope_and_fails_otherwise(shared_data, capsys):
    code, out, err = _cli(capsys, shared_data / STORY, "--max-new-tokens", "600")
    assert code == 0 and out
    assert err == (f"{PROG}: warning: the prompt (1 tokens) plus --max-new-tokens 600 = 601 "
                   "positions exceed the model's 512 (max_position_embeddings); its rotary "
                   "positions extrapolate, but text beyond 512 tokens is usually poor\n")

    # A 1,200-word prompt alone is beyond the 512 positions: the same warning, naming its length
    # (the warning comes before generation, which is replaced here: a 2048-token prefill is slow).
    import slim_jax.models.generate as library

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(library, "generate", lambda *a, **k: type("G", (), {"texts": ["ok"]}))
        code, out, err = _cli(capsys, shared_data / STORY, "--prompt", " ".join(["Tom"] * 1200),
                              "--max-new-tokens", "1")
    assert code == 0 and out == "ok\n" and err.startswith(f"{PROG}: warning: the prompt (")
    assert "exceed the model's 512 (max_position_embeddings)" in err and err.count("\n") == 1

    class Learned:  # a model with learned absolute positions: nothing beyond them
        config = type("Config", (), {"max_position_embeddings": 512})()

    with pytest.raises(ConfigError, match=r"601 positions exceed the model's 512 .* lower "
                                          r"--max-new-tokens to 511 or shorten the prompt"):
        check_positions(Learned(), 1, 600)
    check_positions(Learned(), 12, 500)  # fits


def test_pickle_weights_name_the_flag(hf_llama, tmp_path, capsys):
    base, _ = hf_llama
    import safetensors.torch

    folder = _copy(base, tmp_path / "pickled")  # the same model, its weights as a pickle
    weights = folder / "model.safetensors"
    torch.save(safetensors.torch.load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    err = _one_line_error(capsys, folder)
    assert "--allow-pickle" in err and "allow_pickle" not in err


def test_an_adapter_recorded_for_the_folder_of_the_checkpoint_does_not_warn(shared_data,
                                                                          tmp_path, capsys):
    # slim_finetune records `--model.path tinystories260k` (the folder); generate is given the
    # checkpoint file in it: the same model.
    model, _ = load_llama2c(shared_data / STORY)
    inject(model, r"q_proj$", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(0))
    for recorded in ("tinystories260k", "someone/other-model"):
        save_peft(model, tmp_path / recorded, base_model_name_or_path=recorded)
        code, out, err = _cli(capsys, STORY, "--data-dir", shared_data, "--adapter",
                              tmp_path / recorded, "--max-new-tokens", "8")
        assert code == 0 and out
        if recorded == "tinystories260k":
            assert err == ""
        else:
            assert "was trained on 'someone/other-model'" in err and err.count("\n") == 1


def test_paths_of_the_wrong_kind_are_one_line(hf_llama, tmp_path, capsys):
    base, _ = hf_llama
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    err = _one_line_error(capsys, base, "--adapter", not_a_folder)
    assert str(not_a_folder) in err
    err = _one_line_error(capsys, STORY, "--data-dir", not_a_folder)
    assert str(not_a_folder) in err
