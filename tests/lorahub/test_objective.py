"""The LoRAHub objective against a NumPy transcription of the reference, and population scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.data import ByteTokenizer
from slim_jax.errors import ConfigError
from slim_jax.lorahub import (
    ModuleLibrary,
    build_objective,
    objective_layout,
    population_mesh,
    score_candidates,
)
from tests.lorahub.conftest import adapt_examples

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

value = jax.jit(lambda objective, w: objective(w))


def _set_path(model: nnx.Module, path: str, kernel: np.ndarray) -> None:
    node = model
    for part in path.split("/"):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    node.kernel[...] = jnp.asarray(kernel)


def _merged_by_hand(model, modules, w):
    """A copy of the base with W + scale * (sum_i w_i A_i)(sum_i w_i B_i) in every target
    (LORAHUB.md s2, computed in NumPy)."""
    merged = nnx.clone(model)
    for path in modules[0].factors:
        a_hat = sum(wi * m.factors[path][0] for wi, m in zip(w, modules, strict=True))
        b_hat = sum(wi * m.factors[path][1] for wi, m in zip(w, modules, strict=True))
        node = merged
        for part in path.split("/"):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        base = np.asarray(node.kernel[...], np.float64)
        _set_path(merged, path, base + modules[0].scale * (a_hat @ b_hat))
    return merged


def _token_ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


@nnx.jit
def _forward(model, enc_or_tokens, dec, segments):
    if dec is None:
        return model(enc_or_tokens)
    return model(enc_or_tokens, dec, enc_segment_ids=segments)


def _pad(ids, length: int) -> np.ndarray:
    out = np.full(length, 3, np.int32)  # any token: causal attention or the mask hides it
    out[:len(ids)] = ids
    return out


def _example_ce(model, prompt: str, target: str, encoder_decoder: bool) -> np.ndarray:
    """Per-target-token CE of one example on its own (the reference's -100 labels dropped).

    Inputs are right-padded to 64 so that one compiled forward serves every example: the causal
    and decoder positions read only what precedes them, the encoder padding is masked.
    """
    tok = ByteTokenizer()
    if encoder_decoder:
        enc = tok.encode(prompt, add_eos=True)
        labels = np.array(tok.encode(target, add_eos=True))
        dec = np.concatenate([[0], labels[:-1]])
        segments = (np.arange(64) < len(enc)).astype(np.int32)[None]
        logits = _forward(model, jnp.asarray(_pad(enc, 64)[None]),
                          jnp.asarray(_pad(dec, 64)[None]), jnp.asarray(segments))
        return _token_ce(np.asarray(logits)[0, :len(labels)], labels)
    prompt_ids = tok.encode(prompt, add_bos=True)
    seq = np.array(prompt_ids + tok.encode(target, add_eos=True))
    logits = np.asarray(_forward(model, jnp.asarray(_pad(seq[:-1], 64)[None]), None, None))[0]
    ce = _token_ce(logits[:len(seq) - 1], seq[1:])
    return ce[len(prompt_ids) - 1:]  # only the target tokens and their EOS


def reference_objective(model, modules, w, examples, *, batch_size, encoder_decoder,
                        mode="compat"):
    """sail-sg/lorahub `get_score`: sum over batches of the batch's token-mean CE (-100 labels
    ignored), divided by the number of examples, plus 0.05 * mean|w|."""
    merged = _merged_by_hand(model, modules, w)
    ces = [_example_ce(merged, e.instruction, e.response, encoder_decoder) for e in examples]
    if mode == "compat":
        batches = [ces[i:i + batch_size] for i in range(0, len(ces), batch_size)]
        loss = sum(np.concatenate(b).sum() / sum(len(c) for c in b) for b in batches)
    else:
        loss = sum(c.mean() for c in ces)
    return loss / len(examples) + 0.05 * np.abs(w).mean()


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize(("batch_size", "mode"), [(None, "compat"), (2, "compat"), (2, "mean")])
def test_objective_equals_numpy_reference(family, batch_size, mode, llama_setup, t5_setup):
    model, modules = llama_setup if family == "llama" else t5_setup
    examples = adapt_examples()
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    objective = build_objective(attached, examples, objective_layout(model, ByteTokenizer()),
                                batch_size=batch_size, mode=mode)
    w = np.array([0.7, -0.4, 1.2, 0.3])
    got = float(value(objective, jnp.asarray(w, jnp.float32)))
    want = reference_objective(model, modules, w, examples, batch_size=batch_size or 5,
                               encoder_decoder=family == "t5", mode=mode)
    assert got == pytest.approx(want, rel=1e-5)


def test_compat_loss_is_token_mean_over_k(llama_setup):
    """With one batch, compat = pooled token-mean CE / K: K times below the plain batch mean."""
    model, modules = llama_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    layout = objective_layout(model, ByteTokenizer())
    w = jnp.array([0.5, 0.5, 0.0, 0.0])
    one = build_objective(attached, adapt_examples(), layout, l1_coeff=0.0)
    per_batch = build_objective(attached, adapt_examples(), layout, batch_size=1, l1_coeff=0.0)
    # batch_size=1: the sum of per-example token means / K is the plain mean.
    mean = build_objective(attached, adapt_examples(), layout, mode="mean", l1_coeff=0.0)
    assert float(per_batch(w)) == pytest.approx(float(mean(w)), rel=1e-6)
    assert float(one(w)) != pytest.approx(float(mean(w)), rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_population_equals_each_candidate_alone(family, llama_setup, t5_setup):
    model, modules = llama_setup if family == "llama" else t5_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    objective = build_objective(attached, adapt_examples(),
                                objective_layout(model, ByteTokenizer()))
    weights = jax.random.uniform(jax.random.key(0), (6, 4), minval=-1.5, maxval=1.5)
    together = np.asarray(score_candidates(objective, weights))
    alone = np.array([float(value(objective, w)) for w in weights])
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert len(np.unique(together.round(6))) == 6  # the candidates really differ
    if family == "llama":
        sequential = np.asarray(score_candidates(objective, weights, scoring="sequential"))
        np.testing.assert_allclose(sequential, alone, rtol=1e-5)


def test_population_split_over_devices_equals_one_device(llama_setup):
    model, modules = llama_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    objective = build_objective(attached, adapt_examples(),
                                objective_layout(model, ByteTokenizer()))
    weights = jax.random.uniform(jax.random.key(1), (16, 4), minval=-1.5, maxval=1.5)
    mesh = population_mesh(16)
    assert mesh is not None and mesh.devices.size == 8
    split = score_candidates(objective, weights, mesh=mesh)
    assert len(split.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(split), np.asarray(score_candidates(objective, weights)),
                               rtol=1e-5)


@pytest.mark.parametrize(("population", "devices", "shape"), [
    (16, 8, (8, 1)), (4, 8, (4, 2)), (6, 8, (2, 4)), (5, 8, (1, 8)), (3, 2, (1, 2)),
    (16, 256, (16, 16)), (64, 256, (64, 4)), (64, 32, (32, 1))])
def test_population_mesh_spans_every_device_it_can(population, devices, shape):
    # XLA compiles multi-chip programs for limited-ICI slices (v5e-64/256) only over the whole
    # slice, so the candidates split over `data` and each candidate's rows over `fsdp`.
    from slim_jax.parallel.topology import topology

    pool = jax.devices()[:devices]
    if devices > 8:  # a TPU topology's abstract devices (the `tpu` extra's libtpu)
        pool = list(topology("v5e-256" if devices == 256 else "v5p-64").devices)
    mesh = population_mesh(population, pool)
    assert (mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"]) == (*shape, 1)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("mode", ["compat", "mean"])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_rows_split_over_devices_equal_one_device(family, mode, batch_size, request):
    # P = 4 on 8 devices: 4 candidates x the rows in 2 halves (K = 5 padded to 6, or batches
    # of 2 rows); the sums are reduced over the halves, so the values equal one device's.
    model, modules = request.getfixturevalue(f"{family}_setup")
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    objective = build_objective(attached, adapt_examples(),
                                objective_layout(model, ByteTokenizer()), mode=mode,
                                batch_size=batch_size)
    weights = jax.random.uniform(jax.random.key(2), (4, 4), minval=-1.5, maxval=1.5)
    mesh = population_mesh(4)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    split = score_candidates(objective, weights, mesh=mesh)
    assert len(split.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(split), np.asarray(score_candidates(objective, weights)),
                               rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_scanned_population_split_over_devices_equals_unrolled_one_device(family, request):
    # Under the population's shard_map the scanned layers' adapters vary over the devices and
    # the carry (the embedded tokens) must vary alike (`slim_jax.nn.stack`).
    import dataclasses

    model, modules = request.getfixturevalue(f"{family}_setup")
    scanned = type(model)(dataclasses.replace(model.config, scan_layers=True), rngs=nnx.Rngs(0))
    weights = jax.random.uniform(jax.random.key(1), (16, 4), minval=-1.5, maxval=1.5)
    scores = []
    for base, mesh in ((model, None), (scanned, population_mesh(16))):
        attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(base))
        objective = build_objective(attached, adapt_examples(),
                                    objective_layout(base, ByteTokenizer()))
        scores.append(np.asarray(score_candidates(objective, weights, mesh=mesh)))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_rematerialised_layers_score_like_plain_ones(family, request):
    # The candidate's model is composed inside the population's vmap and run inside the map over
    # batches: remat must not write the outer trace's parameters from the inner one.
    import dataclasses

    model, modules = request.getfixturevalue(f"{family}_setup")
    remat = type(model)(dataclasses.replace(model.config, remat="full"), rngs=nnx.Rngs(0))
    weights = jax.random.uniform(jax.random.key(3), (4, 4), minval=-1.5, maxval=1.5)
    scores = []
    for base in (model, remat):
        attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(base))
        objective = build_objective(attached, adapt_examples(),
                                    objective_layout(base, ByteTokenizer()), batch_size=2)
        scores.append(np.asarray(score_candidates(objective, weights, mesh=population_mesh(4))))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5)


def test_zero_weights_give_the_base_model(llama_setup):
    model, modules = llama_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    examples = adapt_examples()
    objective = build_objective(attached, examples, objective_layout(model, ByteTokenizer()))
    ces = [_example_ce(model, e.instruction, e.response, False) for e in examples]
    base = np.concatenate(ces).mean() / len(examples)
    assert float(objective(jnp.zeros(4))) == pytest.approx(base, rel=1e-5)


def test_truncation_to_max_positions():
    from tests.lorahub.conftest import tiny_llama

    model = tiny_llama(max_positions=64)
    layout = objective_layout(model, ByteTokenizer(), max_length=2048)
    assert layout.capacity == (64,)
    assert objective_layout(model, ByteTokenizer(), max_length=40).capacity == (40,)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "sum"}, "objective mode must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"l1_coeff": -1.0}, "l1_coeff must be >= 0"),
])
def test_bad_objective_settings(kwargs, message, llama_setup):
    model, modules = llama_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    with pytest.raises(ConfigError, match=message):
        build_objective(attached, adapt_examples(), objective_layout(model, ByteTokenizer()),
                        **kwargs)
    with pytest.raises(ConfigError, match="at least one ADAPT example"):
        build_objective(attached, [], objective_layout(model, ByteTokenizer()))


def test_targets_are_padded_no_more_than_needed(t5_setup):
    """Issue 12: 2-7 token answers were padded to 32 decoder positions; the reference pads to the
    longest example. Rows now take the smallest of 4, 6, 8, 12, ... that holds the longest."""
    model, modules = t5_setup
    attached = ModuleLibrary.from_modules(modules).attach(nnx.clone(model))
    examples = adapt_examples()  # byte targets of 2-7 tokens plus EOS: at most 8
    objective = build_objective(attached, examples, objective_layout(model, ByteTokenizer()))
    longest = max(len(e.response) for e in examples) + 1  # + EOS
    assert objective.batches["targets"].shape[-1] == 8 >= longest
    inputs = max(len(e.instruction.encode()) for e in examples) + 1  # + EOS: 34
    assert objective.batches["enc_tokens"].shape[-1] == 48 >= inputs > 32
