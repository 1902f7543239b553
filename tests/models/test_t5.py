"""slim_jax's T5 against transformers' on tiny random checkpoints made here with save_pretrained."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from slim_jax.errors import CheckpointError, ConfigError, ShapeError
from slim_jax.models import generate as gen
from slim_jax.models.generate import trim_at_stop
from slim_jax.models.t5 import T5, T5Config
from slim_jax.models.t5_blocks import relative_position_buckets

VOCAB = 64


@nnx.jit
def _forward(model, enc, dec, enc_segment_ids=None, dec_segment_ids=None):
    """The model's logits, compiled once per shape (cheaper on CPU than op-by-op dispatch)."""
    return model(enc, dec, enc_segment_ids=enc_segment_ids, dec_segment_ids=dec_segment_ids)


def _save_tiny_t5(folder, **overrides) -> transformers.T5ForConditionalGeneration:
    """A tiny random T5 v1.1 (gated-GELU, untied head) saved in `folder`, returned in eval mode."""
    kwargs = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                  num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    if not model.config.scale_decoder_outputs:  # v1.1: the head is its own matrix
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, kwargs["d_model"]))
    with torch.no_grad():  # layer norms start at one: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_t5")
    return _save_tiny_t5(folder), T5.from_pretrained(folder), folder


def _padded_batch(seed: int = 0):
    """Encoder inputs of lengths 11, 7, 3 (right-padded) and decoder inputs of 9, 9, 5."""
    rng = np.random.default_rng(seed)
    enc_mask = (np.arange(11)[None] < np.array([[11], [7], [3]])).astype(np.int32)
    dec_mask = (np.arange(9)[None] < np.array([[9], [9], [5]])).astype(np.int32)
    enc = rng.integers(2, VOCAB, enc_mask.shape) * enc_mask
    dec = rng.integers(2, VOCAB, dec_mask.shape) * dec_mask
    dec[:, 0] = 0  # decoder start
    return enc, enc_mask, dec, dec_mask


def _hf_logits(hf_model, enc, enc_mask, dec, dec_mask) -> np.ndarray:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                        decoder_input_ids=torch.tensor(dec),
                        decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()


def test_logits_match_transformers_on_a_padded_batch(tiny):
    hf_model, model, _ = tiny
    enc, enc_mask, dec, dec_mask = _padded_batch()
    batch = {"enc_tokens": jnp.asarray(enc), "enc_segment_ids": jnp.asarray(enc_mask),
             "dec_tokens": jnp.asarray(dec), "dec_segment_ids": jnp.asarray(dec_mask)}
    ours = np.asarray(nnx.jit(lambda m, b: m.batch_logits(b))(model, batch))
    ref = _hf_logits(hf_model, enc, enc_mask, dec, dec_mask)
    real = dec_mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()  # padded rows stay finite too


def test_original_t5_relu_tied_and_rescaled_matches_transformers(tmp_path):
    hf_model = _save_tiny_t5(tmp_path, feed_forward_proj="relu", tie_word_embeddings=True)
    model = T5.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings and model.config.scale_decoder_outputs
    assert model.lm_head is None and not model.config.is_gated
    enc, enc_mask, dec, dec_mask = _padded_batch(1)
    ours = np.asarray(_forward(model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask),
                               jnp.asarray(dec_mask)))
    ref = _hf_logits(hf_model, enc, enc_mask, dec, dec_mask)
    real = dec_mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_transformers_4_config_is_read_like_transformers_5():
    legacy = {"model_type": "t5", "d_model": 8, "num_layers": 1, "num_heads": 2, "d_kv": 4,
              "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    v5 = {**legacy, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert T5Config.from_hf(legacy) == T5Config.from_hf(v5)
    original = T5Config.from_hf({"model_type": "t5", "feed_forward_proj": "relu"})
    assert original.tie_word_embeddings and original.scale_decoder_outputs


def test_buckets_equal_transformers():
    attention = transformers.models.t5.modeling_t5.T5Attention
    rel = np.arange(-3000, 3000)
    for buckets, distance in ((32, 128), (8, 12), (40, 1000)):
        for bidirectional in (True, False):
            ref = attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
                max_distance=distance).numpy()
            ours = relative_position_buckets(rel, bidirectional=bidirectional,
                                             num_buckets=buckets, max_distance=distance)
            np.testing.assert_array_equal(ours, ref)


def test_cached_decoding_equals_the_full_forward(tiny):
    _, model, _ = tiny
    enc, enc_mask, dec, _ = _padded_batch(2)

    @nnx.jit
    def decode_in_pieces(model, enc, enc_mask, dec):
        state = model.init_decode_state(model.encode(enc, enc_mask), enc_mask, dec.shape[1])
        logits, state = model.decode(dec[:, :4], state)  # a chunk, then token by token
        steps = [logits]
        for t in range(4, dec.shape[1]):
            logits, state = model.decode(dec[:, t:t + 1], state)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1), state.index

    full = _forward(model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask))
    pieces, index = decode_in_pieces(model, jnp.asarray(enc), jnp.asarray(enc_mask),
                                     jnp.asarray(dec))
    np.testing.assert_allclose(pieces, full, atol=1e-5)
    assert int(index) == dec.shape[1]


def test_packed_rows_equal_separate_rows(tiny):
    _, model, _ = tiny
    rng = np.random.default_rng(3)
    enc_a, enc_b = rng.integers(2, VOCAB, 5), rng.integers(2, VOCAB, 4)
    dec_a, dec_b = rng.integers(2, VOCAB, 3), rng.integers(2, VOCAB, 4)
    packed = _forward(model, jnp.asarray(np.concatenate([enc_a, enc_b, [0]]))[None],
                      jnp.asarray(np.concatenate([dec_a, dec_b]))[None],
                      jnp.asarray([[1] * 5 + [2] * 4 + [0]]), jnp.asarray([[1] * 3 + [2] * 4]))
    alone_a = _forward(model, jnp.asarray(enc_a)[None], jnp.asarray(dec_a)[None])
    alone_b = _forward(model, jnp.asarray(enc_b)[None], jnp.asarray(dec_b)[None])
    np.testing.assert_allclose(packed[0, :3], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:], alone_b[0], atol=1e-5)


def _ragged_inputs():
    rng = np.random.default_rng(4)
    return [[*rng.integers(2, VOCAB, n).tolist(), 1] for n in (5, 12, 2)]


def _hf_generate(hf_model, rows, max_new_tokens, eos):
    """transformers' greedy tokens per row, cut before the first `eos` (as `Generation.tokens`)."""
    ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor((ids != 0).astype(np.int64)),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
            pad_token_id=0,
            # transformers 5 sizes its decoder cache by num_layers (the encoder's): off.
            use_cache=False)
    return trim_at_stop(out.numpy()[:, 1:], (eos,))


def test_greedy_generation_matches_transformers(tiny):
    hf_model, model, _ = tiny
    rows = _ragged_inputs()
    ref = _hf_generate(hf_model, rows, 20, eos=1)
    ours = gen.generate(model, rows, max_new_tokens=20)
    assert ours.tokens == ref
    assert [len(r) for r in ref] == [20, 20, 20]  # nothing stopped: every token compared


def test_generation_stops_each_row_at_eos_as_transformers(tiny):
    hf_model, model, _ = tiny
    rows = _ragged_inputs()
    full = gen.generate(model, rows, max_new_tokens=20).tokens
    # A token some row first emits at step k >= 2: as EOS it ends that row there, not the others.
    i, k, eos = next((i, k, t) for i, row in enumerate(full) for k, t in enumerate(row)
                     if k >= 2 and t not in row[:k])
    ours = gen.generate(model, rows, max_new_tokens=20, stop_ids=(eos,))
    assert ours.tokens == _hf_generate(hf_model, rows, 20, eos)
    assert ours.tokens[i] == full[i][:k]
    assert any(len(row) > k for row in ours.tokens)  # another row went on


def test_generation_compiles_once_per_bucket(tiny):
    _, model, _ = tiny
    rows = _ragged_inputs()
    gen.generate(model, rows, max_new_tokens=6)
    size = gen.generation_program._cache_size()
    gen.generate(model, [row[::-1] for row in rows[1:]] + [[3, 1]], max_new_tokens=6)
    assert gen.generation_program._cache_size() == size


def test_sampling_with_a_tiny_nucleus_is_greedy(tiny):
    _, model, _ = tiny
    rows = _ragged_inputs()
    greedy = gen.generate(model, rows, max_new_tokens=5).tokens
    sampled = gen.generate(model, rows, max_new_tokens=5, temperature=0.7, top_p=1e-6,
                                   key=jax.random.key(1)).tokens
    assert sampled == greedy
    with pytest.raises(ConfigError, match="needs a PRNG key"):
        gen.generate(model, rows, max_new_tokens=5, temperature=0.7)
    with pytest.raises(ConfigError, match="prompt 0 is empty"):
        gen.generate(model, [[]], max_new_tokens=5)


def test_bf16_compute_and_storage(tiny):
    _, model, folder = tiny
    bf16 = T5.from_pretrained(folder, dtype="bfloat16", param_dtype="bfloat16")
    kernel = bf16.encoder.block[0].layer[0].SelfAttention.q.kernel
    assert kernel.dtype == jnp.bfloat16
    enc, enc_mask, dec, _ = _padded_batch()
    ours = _forward(bf16, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask))
    ref = _forward(model, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(enc_mask))
    assert ours.dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(ours - ref))) < 0.05 * float(jnp.mean(jnp.abs(ref)))


def test_every_parameter_has_logical_axes(tiny):
    _, model, _ = tiny
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.ndim, path
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "encoder/block/0/layer/0/SelfAttention/q/kernel" in paths
    assert "decoder/block/2/layer/1/EncDecAttention/v/kernel" in paths
    assert "decoder/block/1/layer/2/DenseReluDense/wi_0/kernel" in paths


# ------------------------------------------------------------------------------- bad input


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="feed_forward_proj 'gated-tanh'"):
        T5Config(feed_forward_proj="gated-tanh")
    with pytest.raises(ConfigError, match="d_model must be a positive integer"):
        T5Config(d_model=0)
    with pytest.raises(ConfigError, match="model_type 'bart' is not a T5"):
        T5Config.from_hf({"model_type": "bart"})


def test_checkpoint_of_another_shape_is_named(tiny, tmp_path):
    _, _, folder = tiny
    for name in ("model.safetensors",):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_ff": 32}))
    with pytest.raises(CheckpointError, match=r"wi_0/kernel.*\(16, 24\).*\(16, 32\)"):
        T5.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
    with pytest.raises(CheckpointError, match="encoder/block/1/layer/0/SelfAttention/k/kernel"):
        T5.from_pretrained(tmp_path)


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"lacks config\.json"):
        T5.from_pretrained(tmp_path)


def test_bad_batches_are_named(tiny):
    _, model, _ = tiny
    tokens = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ShapeError, match="missing \\['dec_segment_ids'\\]"):
        model.batch_logits({"enc_tokens": tokens, "enc_segment_ids": tokens, "dec_tokens": tokens})
    with pytest.raises(ShapeError, match="enc_segment_ids has shape \\(2, 4\\)"):
        model(tokens, tokens, enc_segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ShapeError, match="same batch size"):
        model(tokens, jnp.ones((3, 5), jnp.int32))
    with pytest.raises(ShapeError, match="enc_tokens must be \\[batch, length\\]"):
        model.encode(jnp.ones((5,), jnp.int32))
    state = nnx.eval_shape(lambda m: m.init_decode_state(m.encode(tokens), tokens, 4), model)
    with pytest.raises(ShapeError, match="do not fit a decode state of 2 rows and 4 positions"):
        model.decode(jnp.ones((2, 5), jnp.int32), state)
