"""llama2.c checkpoints and tokenizers (Karpathy's `export.py` formats) as `Llama` and `Tokenizer`.

Checkpoint formats read:
  - version 1 ("v1", the data folder's `checkpoint_v1.bin`): uint32 magic 0x616b3432, int32
    version 1, int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len, uint8
    shared_classifier, zero padding to 256 bytes; then float32 tensors in the order of llama2.c's
    `version1_export`: attention norms [L, d], ffn norms [L, d], final norm [d], token embedding
    [V, d], wq, wk, wv, wo, w1, w2, w3 (stacked over layers, PyTorch `[out, in]`), then the
    classifier [V, d] unless shared.
  - the legacy format (no magic; `legacy_export`): the 7 ints (vocab_size negative when the
    classifier is not shared), then embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2,
    w3, final norm, the RoPE tables (skipped), the classifier unless shared.

llama2.c rotates interleaved pairs (x[2i], x[2i+1]) while `Llama` rotates halves (x[i],
x[i + hd/2]) as transformers does; the rows of wq and wk are permuted per head (the permutation
transformers' `convert_llama_weights_to_hf.py` applies), which makes the two identical.

>>> pieces = [b"<unk>", b"<s>", b"</s>", *(b"<0x%02X>" % i for i in range(256)),
...           b" ", b"h", b"i", b"hi", b" hi"]
>>> tok = Llama2cTokenizer(pieces, [0.0] * 259 + [-5.0, -6.0, -7.0, -1.0, -2.0])
>>> tok.encode("hi!", add_bos=True)  # " " "h" "i" -> " " "hi" -> " hi"; "!" is the byte <0x21>
[1, 263, 36]
>>> tok.decode([1, 263, 36])
'hi!'
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from slim_jax.checkpoint import check_finite
from slim_jax.errors import CheckpointError, DataError
from slim_jax.models.hf import assign_params
from slim_jax.models.llama import Llama, LlamaConfig

MAGIC_V1 = 0x616B3432
HEADER_BYTES_V1 = 256
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
_LAYER_TENSORS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def read_llama2c_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The config and `{our parameter path: array}` of a llama2.c checkpoint (v1 or legacy).

    Raises:
      CheckpointError: missing file, unsupported version (e.g. the int8 version 2), or a size that
        does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no llama2.c checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < 28:
        raise CheckpointError(f"{path} is too short ({len(data)} bytes) to be a llama2.c "
                              "checkpoint")
    if struct.unpack_from("<I", data)[0] == MAGIC_V1:
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise CheckpointError(f"{path} is llama2.c export version {version}; only version 1 "
                                  "(float32) and the legacy format are supported")
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        shared = bool(data[36])
        order = ("attention_norm", "ffn_norm", "norm", "embedding", *_LAYER_TENSORS)
        offset = HEADER_BYTES_V1
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared, vocab = vocab > 0, abs(vocab)
        order = ("embedding", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2",
                 "w3", "norm", "freq_cis_real", "freq_cis_imag")
        offset = 28
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq_len) <= 0 or dim % heads:
        raise CheckpointError(f"{path}: implausible llama2.c header (dim {dim}, hidden {hidden}, "
                              f"layers {layers}, heads {heads}, kv heads {kv_heads}, "
                              f"vocab {vocab})")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=seq_len, tie_word_embeddings=shared, bos_id=BOS_ID,
        # llama2.c's run.c stops at BOS: in its training data BOS delimits one story from the next.
        eos_ids=(EOS_ID, BOS_ID), pad_id=UNK_ID,
    )
    hd, kv_dim = dim // heads, kv_heads * (dim // heads)
    shapes = {
        "attention_norm": (layers, dim), "ffn_norm": (layers, dim), "norm": (dim,),
        "embedding": (vocab, dim), "wq": (layers, dim, dim), "wk": (layers, kv_dim, dim),
        "wv": (layers, kv_dim, dim), "wo": (layers, dim, dim), "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden), "w3": (layers, hidden, dim),
        "freq_cis_real": (seq_len, hd // 2), "freq_cis_imag": (seq_len, hd // 2),
        "classifier": (vocab, dim),
    }
    order = order if shared else (*order, "classifier")
    expected = offset + 4 * sum(int(np.prod(shapes[name])) for name in order)
    if len(data) != expected:
        raise CheckpointError(f"{path} has {len(data)} bytes; its header (dim {dim}, hidden "
                              f"{hidden}, layers {layers}, vocab {vocab}, shared classifier "
                              f"{shared}) needs {expected}")
    floats = np.frombuffer(data, np.float32, offset=offset)
    raw, at = {}, 0
    for name in order:
        size = int(np.prod(shapes[name]))
        raw[name] = floats[at:at + size].reshape(shapes[name])
        at += size
    return config, _params_from_llama2c(raw, config)


def _interleaved_to_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Permute rows `[heads * hd, d]` so rotate-half RoPE equals llama2.c's interleaved RoPE.

    Within a head, row 2i + j (pair i, member j) moves to j * hd/2 + i.
    """
    out_dim, d_in = w.shape
    pairs = w.reshape(heads, out_dim // heads // 2, 2, d_in)
    return pairs.transpose(0, 2, 1, 3).reshape(out_dim, d_in)


def _params_from_llama2c(raw: dict[str, np.ndarray], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """llama2.c tensors -> our parameter paths (kernels transposed to `[d_in, d_out]`)."""
    params = {"embed_tokens/embedding": raw["embedding"], "norm/scale": raw["norm"]}
    if "classifier" in raw:
        params["lm_head/kernel"] = raw["classifier"].T
    names = {"wq": "self_attn/q_proj", "wk": "self_attn/k_proj", "wv": "self_attn/v_proj",
             "wo": "self_attn/o_proj", "w1": "mlp/gate_proj", "w2": "mlp/down_proj",
             "w3": "mlp/up_proj"}
    for i in range(cfg.num_layers):
        params[f"layers/{i}/input_layernorm/scale"] = raw["attention_norm"][i]
        params[f"layers/{i}/post_attention_layernorm/scale"] = raw["ffn_norm"][i]
        for name, module in names.items():
            w = raw[name][i]
            if name == "wq":
                w = _interleaved_to_half(w, cfg.num_heads)
            elif name == "wk":
                w = _interleaved_to_half(w, cfg.num_kv_heads)
            params[f"layers/{i}/{module}/kernel"] = w.T
    return params


def load_llama2c(
    checkpoint_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[Llama, Llama2cTokenizer]:
    """A llama2.c model and its tokenizer (`tokenizer.bin` beside the checkpoint by default).

    A made-up v1 file (dim 8, hidden 16, 1 layer, 2 heads, 1 kv head, vocab 4, 632 floats) and
    a 4-piece tokenizer; the real one is `$SLIM_JAX_DATA_DIR/tinystories260k/checkpoint_v1.bin`:

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> header = struct.pack("<Ii7iB", MAGIC_V1, 1, 8, 16, 1, 2, 1, 4, 32, 1).ljust(256, bytes(1))
    >>> _ = (folder / "model.bin").write_bytes(header + np.ones(632, np.float32).tobytes())
    >>> pieces = [b"<unk>", b"<s>", b"</s>", b" "]
    >>> _ = (folder / "tokenizer.bin").write_bytes(struct.pack("<i", 5) + b"".join(
    ...     struct.pack("<fi", 0.0, len(p)) + p for p in pieces))
    >>> model, tok = load_llama2c(folder / "model.bin")
    >>> model.config.num_kv_heads, model.config.tie_word_embeddings, tok.vocab_size
    (1, True, 4)
    """
    config, params = read_llama2c_checkpoint(checkpoint_path)
    check_finite(params, str(checkpoint_path))  # NaN/Inf weights are refused, naming the tensor
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    assign_params(model, params, source=str(checkpoint_path))
    tokenizer_path = (Path(checkpoint_path).with_name("tokenizer.bin") if tokenizer_path is None
                      else tokenizer_path)
    tokenizer = Llama2cTokenizer.from_file(tokenizer_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens, the "
                              f"model {checkpoint_path} {config.vocab_size}")
    return model, tokenizer


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style BPE tokenizer (`tokenizer.bin`), as its `run.c` encodes.

    Encoding: a leading " " piece for non-empty text (sentencepiece's dummy prefix), one piece per
    character (UTF-8 bytes as `<0xNN>` pieces when the character has none), then repeatedly merge
    the adjacent pair whose concatenation is the best-scoring piece (leftmost on ties).
    Ids: 0 `<unk>` (also used as pad), 1 BOS, 2 `</s>`.

    The end of a text (`eos_id`, what `add_eos` appends) is BOS: llama2.c's training data
    delimits one story from the next by BOS alone and its `run.c` stops there, so a llama2.c
    model predicts BOS where a text ends and has never been trained to produce `</s>`. A response
    fine-tuned to end in `</s>` does not learn to stop (the TinyStories model after 150 LoRA steps
    on a Yes/No task: P(`</s>`) 0.005 after the answer) where one ending in BOS does (held-out
    answers "No" and nothing more after the same steps). Generation stops at either.
    """

    bos_id: int | None = BOS_ID
    eos_id: int = BOS_ID
    pad_id: int = UNK_ID

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float]):
        if len(pieces) != len(scores) or len(pieces) <= EOS_ID:
            raise CheckpointError(f"a llama2.c vocabulary needs matching pieces and scores and at "
                                  f"least 3 tokens, got {len(pieces)} pieces, {len(scores)} scores")
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.vocab_size = len(self.pieces)
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self._ids.setdefault(piece, i)
        self._bytes = [_piece_bytes(p) for p in self.pieces]
        self._byte_ids = {}
        for i, piece in enumerate(self.pieces):
            match = _BYTE_PIECE.match(piece)
            if match:
                self._byte_ids.setdefault(int(match.group(1), 16), i)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Llama2cTokenizer:
        """Read `tokenizer.bin`: int32 max_token_length, then per token float32 score, int32
        length and the piece bytes."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no llama2.c tokenizer at {path}")
        data = path.read_bytes()
        pieces, scores, at = [], [], 4
        try:
            while at < len(data):
                score, length = struct.unpack_from("<fi", data, at)
                at += 8
                if length < 0 or at + length > len(data):
                    raise struct.error(f"piece length {length} at byte {at}")
                pieces.append(data[at:at + length])
                scores.append(score)
                at += length
        except struct.error as err:
            raise CheckpointError(f"{path} is not a llama2.c tokenizer.bin: {err}") from err
        return cls(pieces, scores)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (see the class docstring), optionally with BOS / EOS.

        Raises:
          DataError: `text` holds a lone surrogate, which has no UTF-8 encoding.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f"text to encode holds {text[err.start]!r} at position {err.start}, "
                            "which has no UTF-8 encoding (a lone surrogate)") from err
        symbols: list[bytes] = []
        if text:
            symbols.append(b" ")
        symbols.extend(ch.encode("utf-8") for ch in text)
        ids = self._merge(symbols)
        return [BOS_ID] * add_bos + ids + [self.eos_id] * add_eos

    def _merge(self, symbols: list[bytes]) -> list[int]:
        """Best-score-first BPE over a linked list with a lazy heap: O(n log n), same merges as
        run.c's quadratic loop (highest score, leftmost first)."""
        pieces: list[list[bytes]] = []  # each symbol's piece; byte fallbacks expand to several
        for sym in symbols:
            if sym in self._ids:
                pieces.append([sym])
            else:
                pieces.append([self.pieces[self._byte_id(b)] for b in sym])
        piece = [p for group in pieces for p in group]
        n = len(piece)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        version = [0] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if left < 0 or right >= n:
                return
            merged = self._ids.get(piece[left] + piece[right])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], left, right, version[left],
                                      version[right]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, right, v_left, v_right = heapq.heappop(heap)
            if nxt[left] != right or version[left] != v_left or version[right] != v_right:
                continue  # stale: one side was merged since this pair was pushed
            piece[left] += piece[right]
            version[left] += 1
            version[right] += 1
            nxt[left] = nxt[right]
            if nxt[left] < n:
                prv[nxt[left]] = left
            push(left)
            if prv[left] >= 0:
                push(prv[left])
        ids, i = [], 0
        while i < n:
            ids.append(self._ids[piece[i]])
            i = nxt[i]
        return ids

    def _byte_id(self, byte: int) -> int:
        if byte not in self._byte_ids:
            raise CheckpointError(f"the tokenizer has no byte-fallback piece <0x{byte:02X}> for a "
                                  "character missing from its vocabulary")
        return self._byte_ids[byte]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: piece bytes joined (`<0xNN>` as the byte), UTF-8 decoded; the space that
        starts the text or follows BOS is dropped (sentencepiece's dummy prefix)."""
        out = bytearray()
        previous = BOS_ID
        for raw in ids:
            token = int(raw)
            if not 0 <= token < self.vocab_size:
                raise CheckpointError(f"token id {token} is outside the vocabulary [0, "
                                      f"{self.vocab_size})")
            if skip_special_tokens and token in (UNK_ID, BOS_ID, EOS_ID):
                previous = token if token == BOS_ID else previous
                continue
            piece = self._bytes[token]
            if previous == BOS_ID and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            previous = token
        return out.decode("utf-8", errors="replace")


def _piece_bytes(piece: bytes) -> bytes:
    match = _BYTE_PIECE.match(piece)
    return bytes([int(match.group(1), 16)]) if match else piece
