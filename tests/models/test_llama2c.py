"""The real llama2.c model (tinystories260k): loading, llama2.c's own forward pass, the tokenizer,
and a coherent story from BOS through the library's generation."""

from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from slim_jax.errors import CheckpointError, DataError
from slim_jax.models.generate import generate
from slim_jax.models.llama2c import (
    Llama2cTokenizer,
    load_llama2c,
    read_llama2c_checkpoint,
)
from slim_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(shared_data):
    return shared_data / "tinystories260k"


@pytest.fixture(scope="module")
def loaded(folder):
    return load_llama2c(folder / "checkpoint_v1.bin")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return Llama2cTokenizer.from_file(folder / "tokenizer.bin")


def _raw_v1(path):
    """The v1 file's tensors, read here independently of the library (llama2.c's export order)."""
    data = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, _ = struct.unpack_from("<7i", data, 8)
    kv = kv_heads * dim // heads
    shapes = [("att_norm", (layers, dim)), ("ffn_norm", (layers, dim)), ("norm", (dim,)),
              ("emb", (vocab, dim)), ("wq", (layers, dim, dim)), ("wk", (layers, kv, dim)),
              ("wv", (layers, kv, dim)), ("wo", (layers, dim, dim)),
              ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim))]
    floats, raw, at = np.frombuffer(data, np.float32, offset=256), {}, 0
    for name, shape in shapes:
        raw[name] = floats[at:at + int(np.prod(shape))].reshape(shape)
        at += int(np.prod(shape))
    assert at == floats.size
    return raw, (dim, hidden, layers, heads, kv_heads, vocab)


def _llama2c_forward(raw, dims, tokens):
    """llama2.c's run.c forward (interleaved-pair RoPE) in numpy: logits [seq, vocab]."""
    dim, _, layers, heads, kv_heads, _ = dims
    hd, s = dim // heads, len(tokens)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * w

    def rope(x):  # x: [s, n, hd]; rotate pairs (2i, 2i+1) by pos / 10000^(2i/hd)
        freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
        angle = np.arange(s)[:, None, None] * freq
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * np.cos(angle) - b * np.sin(angle)
        out[..., 1::2] = a * np.sin(angle) + b * np.cos(angle)
        return out

    x = raw["emb"][tokens].astype(np.float64)
    causal = np.tril(np.ones((s, s), bool))
    for layer in range(layers):
        h = rms(x, raw["att_norm"][layer])
        q = rope((h @ raw["wq"][layer].T).reshape(s, heads, hd))
        k = rope((h @ raw["wk"][layer].T).reshape(s, kv_heads, hd))
        v = (h @ raw["wv"][layer].T).reshape(s, kv_heads, hd)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(s, dim) @ raw["wo"][layer].T
        h = rms(x, raw["ffn_norm"][layer])
        gate = h @ raw["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ raw["w3"][layer].T)) @ raw["w2"][layer].T
    return rms(x, raw["norm"]) @ raw["emb"].T


def test_logits_equal_llama2c_forward(folder, loaded, tokenizer):
    model, _ = loaded
    raw, dims = _raw_v1(folder / "checkpoint_v1.bin")
    tokens = tokenizer.encode("Once upon a time, there was a big dog named Max.", add_bos=True)
    ref = _llama2c_forward(raw, dims, np.asarray(tokens))
    got = nnx.jit(lambda m, t: m(t))(model, jnp.asarray([tokens]))[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_config_from_header(loaded):
    model, tok = loaded
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.vocab_size, cfg.max_position_embeddings) == (
        64, 172, 5, 8, 4, 512, 512)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    assert sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))) == 260_032
    assert isinstance(tok, Tokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 1, 512)


def test_greedy_story_from_bos(loaded):
    model, tok = loaded
    # An empty prompt starts from BOS; the second prompt is left-padded beside it.
    out = generate(model, ["", "Once upon a time, there was a dog"], tokenizer=tok,
                   max_new_tokens=200)
    story, dog = out.texts
    assert story.startswith("Once upon a time")
    assert "Lily" in story and " she " in story.lower()
    assert len(story.split()) > 60
    assert dog.startswith("named ") and " he " in dog.lower()


def test_a_story_ends_in_bos_not_eos(loaded):
    """Why `Llama2cTokenizer.eos_id` is BOS: the pretrained model ends a story by predicting BOS
    (its training data's delimiter) and gives `</s>` (id 2) almost nothing there."""
    model, tok = loaded
    out = generate(model, [""], tokenizer=tok, max_new_tokens=480)
    story = out.tokens[0]
    assert len(story) < 480, "the greedy story should end by itself (at BOS)"
    logits = model(jnp.asarray([[tok.bos_id, *story]], jnp.int32))[0, -1]
    probs = jax.nn.softmax(logits)
    assert int(jnp.argmax(logits)) == tok.bos_id == tok.eos_id
    assert float(probs[2]) < 1e-3 < 0.1 < float(probs[tok.bos_id])


def _runc_encode(tok, text):
    """run.c's quadratic BPE loop, verbatim: the reference for the library's heap version."""
    ids = [tok.pieces.index(b" ")] if text else []
    for ch in text:
        piece = ch.encode("utf-8")
        ids += [tok.pieces.index(piece)] if piece in tok.pieces else [b + 3 for b in piece]
    while True:
        best, best_id, best_at = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok.pieces[ids[i]] + tok.pieces[ids[i + 1]]
            if merged in tok.pieces and tok.scores[tok.pieces.index(merged)] > best:
                best, best_id, best_at = tok.scores[tok.pieces.index(merged)], \
                    tok.pieces.index(merged), i
        if best_at < 0:
            return ids
        ids[best_at:best_at + 2] = [best_id]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("abcdeLily  ,.!\n'é™😀")
                    | st.characters(exclude_categories=("Cs",)), max_size=40))
def test_tokenizer_round_trips_and_matches_runc(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == _runc_encode(tokenizer, text)


def test_tokenizer_specials(tokenizer):
    ids = tokenizer.encode("Lily", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 1  # a text ends in BOS, as llama2.c's data delimits them
    assert tokenizer.decode(ids) == "Lily"
    assert "<s>" in tokenizer.decode(ids, skip_special_tokens=False)
    assert tokenizer.encode("") == []
    with pytest.raises(DataError, match="no UTF-8 encoding"):
        tokenizer.encode("a\ud800")
    with pytest.raises(CheckpointError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        tokenizer.decode([512])


def _write_legacy(path, raw, dims, *, shared):
    """Write the tensors in llama2.c's legacy layout (RoPE tables included, ignored on load)."""
    dim, hidden, layers, heads, kv_heads, vocab = dims
    seq_len, hd = 16, dim // heads
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab,
                         seq_len)
    tables = [np.zeros((seq_len, hd // 2), np.float32)] * 2
    parts = [raw["emb"], raw["att_norm"], raw["wq"], raw["wk"], raw["wv"], raw["wo"],
             raw["ffn_norm"], raw["w1"], raw["w2"], raw["w3"], raw["norm"], *tables]
    parts += [] if shared else [raw["emb"] * 2]
    path.write_bytes(header + b"".join(np.ascontiguousarray(p, np.float32).tobytes()
                                       for p in parts))


def test_legacy_format_reads_the_same_weights(folder, tmp_path):
    raw, dims = _raw_v1(folder / "checkpoint_v1.bin")
    _, v1 = read_llama2c_checkpoint(folder / "checkpoint_v1.bin")
    _write_legacy(tmp_path / "shared.bin", raw, dims, shared=True)
    _write_legacy(tmp_path / "unshared.bin", raw, dims, shared=False)
    cfg, legacy = read_llama2c_checkpoint(tmp_path / "shared.bin")
    assert cfg.tie_word_embeddings and legacy.keys() == v1.keys()
    for name in v1:
        np.testing.assert_array_equal(legacy[name], v1[name])
    cfg, unshared = read_llama2c_checkpoint(tmp_path / "unshared.bin")
    assert not cfg.tie_word_embeddings
    np.testing.assert_array_equal(unshared["lm_head/kernel"], raw["emb"].T * 2)


def test_bad_checkpoints_are_named(folder, tmp_path):
    with pytest.raises(CheckpointError, match=r"no llama2\.c checkpoint at"):
        read_llama2c_checkpoint(tmp_path / "missing.bin")
    data = (folder / "checkpoint_v1.bin").read_bytes()
    (tmp_path / "v2.bin").write_bytes(data[:4] + struct.pack("<i", 2) + data[8:])
    with pytest.raises(CheckpointError, match="export version 2; only version 1"):
        read_llama2c_checkpoint(tmp_path / "v2.bin")
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=r"has 1040380 bytes; its header .* needs 1040384"):
        read_llama2c_checkpoint(tmp_path / "cut.bin")
    with pytest.raises(CheckpointError, match=r"no llama2\.c tokenizer at"):
        load_llama2c(folder / "checkpoint_v1.bin", tmp_path / "tokenizer.bin")
