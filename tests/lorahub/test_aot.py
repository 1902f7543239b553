"""Compile-only runs of LoRAHub's programs for a small TPU topology: FLOPs and the MFU bound.

The model FLOPs are counted here by hand from the architecture (2 per parameter and token it
passes: the encoder's parameters and the decoder's cross-attention keys/values see the encoder
tokens, every other parameter the decoder tokens; a causal model's see every token), so the MFU
bound the report prints is checked against a count that does not go through the code under test.
"""

from __future__ import annotations

import json

import pytest

from slim_jax.lorahub.aot import compile_generation, compile_population
from slim_jax.parallel.topology import topology
from slim_jax.train.aot import architecture, model_factory

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs jax[tpu] (libtpu)")

D, HEADS, D_KV, D_FF, VOCAB, LAYERS, BUCKETS = 64, 4, 16, 128, 64, 2, 32
T5 = {"model_type": "t5", "vocab_size": VOCAB, "d_model": D, "d_kv": D_KV, "d_ff": D_FF,
      "num_layers": LAYERS, "num_decoder_layers": LAYERS, "num_heads": HEADS,
      "relative_attention_num_buckets": BUCKETS, "feed_forward_proj": "gated-gelu",
      "tie_word_embeddings": False}
LLAMA = dict(architecture("llama-3-8b"), vocab_size=64, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
P, N, RANK, K, INPUT, TARGET = 16, 4, 2, 2, 32, 8  # P candidates over v5e-4's 4 chips
BATCH, NEW = 4, 6


def t5_params(rank: int = 0) -> tuple[int, int]:
    """`(encoder side, decoder side)` parameters of `T5`, with rank-`rank` LoRA on every q and v
    (targets `(q|v)$`: self-attention q, v in both stacks, cross-attention q and v)."""
    inner = HEADS * D_KV
    lora = rank * (D + inner)
    attention, mlp = 4 * D * inner, 3 * D * D_FF  # q, k, v, o; gated wi_0, wi_1 and wo
    encoder = LAYERS * (attention + mlp + 2 * D + 2 * lora) + BUCKETS * HEADS + D
    cross_kv = LAYERS * (2 * D * inner + lora)  # the decoder's cross-attention k, v (and v's LoRA)
    decoder = (LAYERS * (attention + 2 * D * inner + mlp + 3 * D + 3 * lora)
               + BUCKETS * HEADS + D + 2 * VOCAB * D)  # + shared embedding, untied lm_head
    return encoder + cross_kv, decoder


def llama_params(rank: int = 0) -> int:
    """Parameters of `LLAMA` (4 heads and 2 KV heads of 16), with rank-`rank` LoRA on q_proj
    and v_proj."""
    q, kv = 4 * 16, 2 * 16
    layer = (2 * D * q + 2 * D * kv + 3 * D * 128 + 2 * D  # q, o; k, v; gate, up, down; norms
             + rank * (D + q) + rank * (D + kv))
    return LAYERS * layer + D + 2 * 64 * D  # final norm, embedding, untied lm_head


@pytest.fixture(scope="module")
def v5e4():
    return topology("v5e-4")


def _population(arch, topo, targets, **overrides):
    return compile_population(model_factory(arch, overrides=overrides), topo, population=P,
                              num_modules=N, rank=RANK, alpha=4.0, targets=targets,
                              num_examples=K, input_len=INPUT, target_len=TARGET)


def test_t5_population_scoring_reports_flops_and_the_mfu_bound(v5e4):
    r = _population(T5, v5e4, r"(q|v)$")
    assert r.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and r.fits
    encoder, decoder = t5_params(RANK)
    per_chip = P // 4 * 2 * K * (encoder * INPUT + decoder * TARGET)
    assert r.model_flops == per_chip
    assert r.flops > 0 and r.flops_exact
    assert r.mfu_bound == pytest.approx(per_chip / r.flops, rel=1e-12)
    assert 0.5 < r.mfu_bound <= 1.0  # attention and the loss are FLOPs the estimate leaves out
    assert r.step_s_at_peak == r.flops / 197e12
    assert r.lines()[2].endswith(f"MFU <= {r.mfu_bound:.2f}")


def test_scanned_t5_population_counts_every_layer_like_the_unrolled_one(v5e4):
    # Over the population's devices (shard_map): compiles only with the carry made to vary
    # alike (`slim_jax.nn.stack`). The scanned program does about 6e6 FLOPs more outside its
    # layer loops (the same at 1, 2 or 4 layers: measured), 9% of this tiny one.
    scanned = _population(T5, v5e4, r"(q|v)$", scan_layers=True)
    unrolled = _population(T5, v5e4, r"(q|v)$")
    assert scanned.flops_exact and scanned.xla_flops < 0.6 * scanned.flops
    assert scanned.model_flops == unrolled.model_flops
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.12)


def test_t5_generation_counts_every_new_token_and_reports_the_bound(v5e4):
    r = compile_generation(model_factory(T5), v5e4, batch_size=BATCH, input_len=INPUT,
                           max_new_tokens=NEW)
    encoder, decoder = t5_params()
    model = 2 * (encoder * BATCH * INPUT + decoder * BATCH * NEW)
    assert r.model_flops == model
    # The decoding loop stops once every row has ended: counted to max_new_tokens.
    assert r.flops_count == "at most" and r.flops > r.xla_flops
    assert r.mfu_bound == pytest.approx(model / r.flops, rel=1e-12)
    assert 0.5 < r.mfu_bound <= 1.0
    assert "the most a call does" in r.lines()[2] and "MFU <= " in r.lines()[2]


def test_scanned_t5_generation_counts_every_layer_of_every_step_like_the_unrolled_one(v5e4):
    # The layer scans run inside the decoding loop: nested loops, each counted as it runs.
    scanned, unrolled = (compile_generation(model_factory(T5, overrides={"scan_layers": scan}),
                                            v5e4, batch_size=BATCH, input_len=INPUT,
                                            max_new_tokens=NEW) for scan in (True, False))
    assert scanned.flops_count == "at most" and scanned.xla_flops < 0.5 * scanned.flops
    assert scanned.model_flops == unrolled.model_flops
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.05)


def test_causal_population_and_generation_count_every_parameter_per_token(v5e4):
    scoring = _population(LLAMA, v5e4, r"(q|v)_proj$")
    assert scoring.model_flops == P // 4 * 2 * llama_params(RANK) * K * INPUT
    generation = compile_generation(model_factory(LLAMA), v5e4, batch_size=BATCH,
                                    input_len=INPUT, max_new_tokens=NEW)
    assert generation.model_flops == 2 * llama_params() * BATCH * (INPUT + NEW - 1)
    for r in (scoring, generation):
        assert r.mfu_bound == pytest.approx(r.model_flops / r.flops, rel=1e-12)
        assert 0.3 < r.mfu_bound <= 1.2


@pytest.mark.slow  # three programs compiled through the command line
def test_lorahub_bbh_compile_only_prints_the_bound_of_every_program(tmp_path, capsys):
    from experiments.lorahub_bbh import main

    (tmp_path / "config.json").write_text(json.dumps(T5))
    args = ["--preset", "flan-t5-large", "--model.path", str(tmp_path), "--compile-only", "true",
            "--topology", "v5e-4", "--protocol.max-length", "32", "--protocol.k", "2",
            "--protocol.modules-per-run", "4", "--protocol.max-new-tokens", "4",
            "--protocol.generation-batch-size", "4", "--upstream.rank", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    programs = [line for line in out if " on v5e-4 " in line]
    assert [p.split(" on ")[0] for p in programs] == [
        "population scoring P=16", "population scoring P=64", "greedy generation b=4"]
    flops = [line for line in out if line.startswith("  FLOPs per chip ")]
    assert len(flops) == 3
    for line in flops:
        assert "at peak 197 TFLOP/s" in line
        assert 0 < float(line.rsplit("MFU <= ", 1)[1]) <= 1.0
    assert out[-1].startswith("fits: ")


def test_lorahub_compile_only_exits_by_every_program_and_names_the_one_that_does_not_fit(
        monkeypatch, capsys):
    # No compile: the two programs' reports stand in, so this checks the command's verdict over
    # all programs (and the preset's generation batch, the one POD.md measured to fit v5e-16).
    import experiments.compile_only as compile_only
    from experiments.lorahub_bbh import main
    from slim_jax.parallel.topology import GIB
    from slim_jax.train.aot import CompileReport

    topo = topology("v5e-16")
    asked = {}

    def fake(program, gib):
        return CompileReport(program, topo, {"data": 1}, {"base": 3 * GIB}, int(gib * GIB),
                             int((gib + 3) * GIB), 1e12, 5e11, 1.0)

    def population(factory, topo, *, population, **kwargs):
        return fake(f"population scoring P={population}", 2.0)

    def generation(factory, topo, *, batch_size, input_len, max_new_tokens, gib):
        asked.update(batch_size=batch_size, input_len=input_len, new=max_new_tokens)
        return fake(f"greedy generation b={batch_size}", gib)

    monkeypatch.setattr(compile_only, "compile_population", population)
    args = ["--preset", "flan-t5-large", "--compile-only", "true", "--topology", "v5e-16"]
    for gib, code in ((8.0, 0), (31.0, 1)):
        monkeypatch.setattr(compile_only, "compile_generation",
                            lambda *a, gib=gib, **k: generation(*a, gib=gib, **k))
        assert main(args) == code
        out = capsys.readouterr().out.strip().splitlines()
        assert [line.split(" on ")[0] for line in out if " on v5e-16 " in line] == [
            "population scoring P=16", "population scoring P=64", "greedy generation b=16"]
        assert asked == {"batch_size": 16, "input_len": 2048, "new": 256}
        assert out[-1] == ("fits: 11.0 of 16.0 GiB per chip" if code == 0 else
                           "does not fit: greedy generation b=16 needs 34.0 GiB, of 16.0 GiB "
                           "per chip on v5e-16")


def test_population_scoring_spans_a_whole_limited_routing_slice():
    # XLA compiles a multi-chip program for v5e-64 only over all 64 chips: P = 16 candidates
    # take 16 x 4 chips, each candidate's K = 2 rows padded to 4 and split over 4 of them.
    r = compile_population(model_factory(T5), topology("v5e-64"), population=P, num_modules=N,
                           rank=RANK, alpha=4.0, targets=r"(q|v)$", num_examples=K,
                           input_len=INPUT, target_len=TARGET)
    assert r.mesh == {"data": 16, "fsdp": 4, "tensor": 1} and r.fits
    encoder, decoder = t5_params(RANK)
    assert r.model_flops == 2 * K * (encoder * INPUT + decoder * TARGET) / 4  # one candidate
    assert r.flops_exact and 0.2 < r.mfu_bound <= 0.5  # two of each candidate's 4 rows padding
