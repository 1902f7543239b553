"""`T5Config.scan_layers` changes the program, not the maths or the files: a scanned T5 (encoder
and decoder stacks, the relative position bias table on each stack) starts from the unrolled
one's weights and gives its logits, losses, LoRA gradients and SLIM state (1e-5), with remat full
and none; each stack compiles one block body; Hugging Face, PEFT and slim_jax adapter files keep
per-layer names both ways; greedy generation (decoder cache stacked) is identical; LoRAHub's
composition of stacked adapters scores what the unrolled one scores."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.data import ByteTokenizer, Example
from slim_jax.lorahub import LoRAModule, ModuleLibrary
from slim_jax.lorahub.library import module_from_model
from slim_jax.lorahub.objective import build_objective, objective_layout
from slim_jax.lorahub.upstream import UpstreamConfig, prepare_model, save_module
from slim_jax.models.adapter_io import load_adapter_checkpoint, save_adapter_checkpoint
from slim_jax.models.generate import generate
from slim_jax.models.peft_io import load_peft, load_peft_factors, save_peft
from slim_jax.models.t5 import T5, T5Config
from slim_jax.models.t5_hf import path_to_hf_name
from slim_jax.nn import LoRAConfig, SlimConfig, adapter_spec, inference_view, inject
from slim_jax.nn.stack import LayerStack
from slim_jax.parallel.mesh import MeshConfig, make_mesh
from slim_jax.train.forward import masked_batch_logits

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

CFG = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=3,
               num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, eos_token_id=2)
HF_CONFIG = {"model_type": "t5", "vocab_size": CFG.vocab_size, "d_model": 16, "d_kv": 4,
             "d_ff": 32, "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4,
             "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
             "eos_token_id": 2, "scale_decoder_outputs": False}
BATCH = {"enc_tokens": jnp.array([[5, 9, 3, 7, 2], [4, 8, 2, 0, 0]]),
         "enc_segment_ids": jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
         "dec_tokens": jnp.array([[0, 6, 5, 3], [0, 7, 1, 0]]),
         "dec_segment_ids": jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
         "targets": jnp.array([[6, 5, 3, 2], [7, 1, 2, 0]])}
LORA = "Attention/(q|v)$"  # self- and cross-attention, encoder and decoder


def _t5(scan: bool, *, remat: str = "none", adapters: str = "both") -> T5:
    model = T5(dataclasses.replace(CFG, scan_layers=scan, remat=remat), rngs=nnx.Rngs(0))
    if adapters in ("both", "slim"):  # the decoder's cross-attention keys see encoder tokens
        inject(model, "EncDecAttention/k$", SlimConfig(rank=2, num_clusters=2), rngs=nnx.Rngs(1))
    if adapters in ("both", "lora"):
        inject(model, LORA, LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(2))
    for _, leaf in nnx.iter_graph(model):  # non-zero B factors: every gradient path matters
        if isinstance(leaf, nnx.LoRAParam):
            leaf[...] = leaf[...] + 0.1
    return model


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    """`{unrolled path: array}`: stacked `<stack>/block/layer/...[i]` read as `<stack>/block/i/...`,
    a stack's own bias table as its first block's."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, value = "/".join(map(str, path)), var.get_value()
        if value is None or jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            continue
        stack, _, rest = name.partition("/")
        if rest.startswith("block/layer/"):
            for i in range(value.shape[0]):
                out[f"{stack}/block/{i}/{rest.removeprefix('block/layer/')}"] = np.asarray(value[i])
        elif rest.startswith("relative_attention_bias/"):
            out[f"{stack}/block/0/layer/0/SelfAttention/{rest}"] = np.asarray(value)
        else:
            out[name] = np.asarray(value)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


def _logits(model: T5) -> np.ndarray:
    return np.asarray(model.batch_logits(BATCH))


@nnx.jit
def _loss_and_grads(model):
    def loss(model):
        logits = masked_batch_logits(model, BATCH)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, BATCH["targets"][..., None], axis=-1)[..., 0]
        return -(picked * BATCH["dec_segment_ids"]).mean()

    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


# remat "full" inside the scanned bodies is the pod presets' setting; "none" compiles a second
# pair of programs (about as long again), so it is marked slow, as in test_scan.py.
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_scanned_equals_unrolled_in_logits_loss_gradients_and_slim_state(remat):
    unrolled, scanned = _t5(False), _t5(True, remat=remat)
    assert isinstance(scanned.encoder.block, LayerStack)
    assert isinstance(scanned.decoder.block, LayerStack)
    q = scanned.decoder.block.layer.layer[1].EncDecAttention.q
    assert q.lora_a.shape[0] == CFG.num_decoder_layers
    assert q.lora_a.get_metadata("logical_axes")[0] == "layers"
    assert scanned.encoder.block.layer.layer[0].SelfAttention.relative_attention_bias is None
    # the same seed gives the same weights and adapters, stacked (the bias table on the stack)
    _assert_same(_flat(nnx.state(unrolled)), _flat(nnx.state(scanned)))
    np.testing.assert_allclose(_logits(scanned), _logits(unrolled), atol=1e-5)
    loss_u, grads_u = _loss_and_grads(unrolled)
    loss_s, grads_s = _loss_and_grads(scanned)
    np.testing.assert_allclose(float(loss_s), float(loss_u), atol=1e-5)
    _assert_same(_flat(grads_u), _flat(grads_s))
    # SLIM's cluster statistics (encoder-token masks inside the decoder stack) updated alike
    _assert_same(_flat(nnx.state(unrolled)), _flat(nnx.state(scanned)))


def _hlo(num_layers: int, scan: bool) -> str:
    config = dataclasses.replace(CFG, num_layers=num_layers, num_decoder_layers=num_layers,
                                 scan_layers=scan)
    model = T5(config, rngs=nnx.Rngs(0))
    inject(model, "SelfAttention/q$", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: nnx.merge(graphdef, s).batch_logits(BATCH)).lower(state).as_text()


def test_scanned_program_size_does_not_grow_with_depth():
    two, eight = _hlo(2, True), _hlo(8, True)
    # encoder blocks, decoder cross-attention keys/values, decoder blocks: one loop each
    assert eight.count("stablehlo.while") == 3
    assert len(eight) < 1.1 * len(two)
    assert len(_hlo(8, False)) > 2 * len(_hlo(2, False))  # unrolled: a copy per block


def test_from_pretrained_builds_the_stacked_layout_also_on_a_mesh(tmp_path, sibling):
    sibling("test_sharded_loading")._save(T5(CFG, rngs=nnx.Rngs(3)), tmp_path, HF_CONFIG,
                                          path_to_hf_name)
    plain = T5.from_pretrained(tmp_path)
    scanned = T5.from_pretrained(tmp_path, scan_layers=True, remat="full")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
    sharded = T5.from_pretrained(tmp_path, scan_layers=True, mesh=mesh)
    np.testing.assert_array_equal(  # the first block's table, on the stack
        np.asarray(scanned.decoder.relative_attention_bias.embedding[...]),
        np.asarray(plain.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
                   .embedding[...]))
    wi = sharded.encoder.block.layer.layer[1].DenseReluDense.wi_0.kernel[...]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in wi.addressable_shards} == {(3, 4, 16)}  # [3, 16, 32] / 4 x 2
    want = _logits(plain)
    np.testing.assert_allclose(_logits(scanned), want, atol=1e-5)
    np.testing.assert_allclose(_logits(sharded), want, atol=1e-5)


def test_peft_adapter_round_trips_between_scanned_and_unrolled(tmp_path):
    trained = _t5(True, adapters="lora")
    save_peft(trained, tmp_path / "a", base_model_name_or_path="toy")
    unrolled = T5(CFG, rngs=nnx.Rngs(0))
    paths = load_peft(unrolled, tmp_path / "a")
    assert "decoder/block/1/layer/1/EncDecAttention/v" in paths
    want = _logits(trained)
    np.testing.assert_allclose(_logits(unrolled), want, atol=1e-5)
    save_peft(unrolled, tmp_path / "b", base_model_name_or_path="toy")
    scanned = T5(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    load_peft(scanned, tmp_path / "b")
    assert adapter_spec(scanned) == adapter_spec(unrolled)
    np.testing.assert_allclose(_logits(scanned), want, atol=1e-5)


def test_slim_jax_adapter_checkpoint_round_trips_between_scanned_and_unrolled(tmp_path):
    trained = _t5(True)
    _loss_and_grads(trained)  # SLIM's clusters initialised: their state must travel too
    save_adapter_checkpoint(trained, tmp_path / "a", step=1)
    unrolled = T5(CFG, rngs=nnx.Rngs(0))  # the same base; adapters and state from the file
    load_adapter_checkpoint(unrolled, tmp_path / "a")
    _assert_same(_flat(nnx.state(trained)), _flat(nnx.state(unrolled)))
    save_adapter_checkpoint(unrolled, tmp_path / "b", step=1)
    scanned = T5(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    load_adapter_checkpoint(scanned, tmp_path / "b")
    _assert_same(_flat(nnx.state(trained)), _flat(nnx.state(scanned)))


def test_greedy_generation_is_identical_scanned_and_unrolled():
    prompts = [[5, 9, 3, 2], [7, 2]]
    models = [inference_view(_t5(scan, adapters="lora")) for scan in (False, True)]
    outs = [generate(m, prompts, max_new_tokens=5, stop_ids=()).tokens for m in models]
    assert outs[0] == outs[1]
    state = models[1].init_decode_state(jnp.zeros((2, 4, CFG.d_model)), jnp.ones((2, 4)), 6)
    assert state.self_kv.k.shape == (CFG.num_decoder_layers, 2, 6, CFG.num_heads, CFG.d_kv)
    assert state.max_length == 6


def test_lorahub_objective_and_merged_model_equal_scanned_and_unrolled():
    rng = np.random.default_rng(0)
    layers = {path: (m.in_features, m.out_features) for path, m in nnx.iter_modules(
        T5(CFG, rngs=nnx.Rngs(0))) if isinstance(m, nnx.Linear)
        and "/".join(map(str, path)).endswith(("SelfAttention/q", "EncDecAttention/v"))}
    layers = {"/".join(map(str, p)): shape for p, shape in layers.items()}
    modules = [LoRAModule(f"m{i}", 2, 4.0, {
        path: (0.5 * rng.standard_normal((d_in, 2)).astype(np.float32),
               0.5 * rng.standard_normal((2, d_out)).astype(np.float32))
        for path, (d_in, d_out) in layers.items()}) for i in range(3)]
    library = ModuleLibrary.from_modules(modules)
    examples = [Example("Q: 2+2?", "4"), Example("Q: sky?", "blue"), Example("Q: a", "(B)")]
    weights = jnp.array([[0.5, -0.2, 1.0], [0.1, 0.3, -0.4]])
    values, merged = [], []
    for scan in (False, True):
        model = T5(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
        attached = library.attach(model)
        if scan:  # the factors laid out like the stacked adapters: [N, layers, d_in, r]
            leaf = attached.stacked["encoder"]["block"]["layer"]["layer"][0]
            assert leaf["SelfAttention"]["q"]["lora_a"][...].shape == (3, CFG.num_layers, 16, 2)
        objective = build_objective(attached, examples, objective_layout(model, ByteTokenizer()))
        values.append(np.asarray(jax.jit(lambda o, w: o.population(w))(objective, weights)))
        merged.append(_logits(attached.merged_model(weights[0])))
    np.testing.assert_allclose(values[1], values[0], atol=1e-5)
    np.testing.assert_allclose(merged[1], merged[0], atol=1e-5)


def test_an_upstream_module_of_a_scanned_model_is_read_and_saved_under_per_layer_names(tmp_path):
    scanned = T5(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    prepare_model(scanned, UpstreamConfig(lora=LoRAConfig(rank=2, alpha=4), targets=LORA))
    own = module_from_model(scanned, "m")
    assert own.factors["decoder/block/1/layer/1/EncDecAttention/q"][0].shape == (16, 2)
    other = LoRAModule("m", 2, 4.0, {p: (a + 1, b + 1) for p, (a, b) in own.factors.items()})
    save_module(scanned, other, tmp_path / "m", base_model_name_or_path="toy")
    _, factors = load_peft_factors(tmp_path / "m", T5(CFG, rngs=nnx.Rngs(0)))
    assert sorted(factors) == list(other.paths)
    for path, (a, b) in other.factors.items():
        np.testing.assert_allclose(factors[path][0], a, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(factors[path][1], b, atol=1e-6, err_msg=path)
    back = module_from_model(scanned, "m")  # the model's own factors are back, stacked
    assert isinstance(scanned.decoder.block, LayerStack)
    for path, (a, b) in own.factors.items():
        np.testing.assert_array_equal(back.factors[path][0], a)
        np.testing.assert_array_equal(back.factors[path][1], b)
