"""`scan_layers` changes the program, not the maths or the files: a scanned Llama starts from the
unrolled one's weights and gives its logits, losses, adapter gradients and SLIM state (1e-5), with
LoRA and SLIM and with remat; its program holds one layer body in one while loop; Hugging Face,
PEFT and slim_jax adapter files keep per-layer names both ways; greedy generation is identical."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.models.adapter_io import load_adapter_checkpoint, save_adapter_checkpoint
from slim_jax.models.generate import generate
from slim_jax.models.llama import Llama, LlamaConfig
from slim_jax.models.llama_hf import path_to_hf_name
from slim_jax.models.peft_io import load_peft, save_peft
from slim_jax.nn import LoRAConfig, SlimConfig, adapter_spec, inference_view, inject
from slim_jax.nn.stack import LayerStack
from slim_jax.parallel.mesh import MeshConfig, make_mesh
from slim_jax.parallel.rules import logical_to_spec
from slim_jax.train.forward import masked_batch_logits

pytestmark = pytest.mark.usefixtures("quick_compile")  # compile-bound: tiny models

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=3,
                  num_heads=4, num_kv_heads=2)
HF_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
             "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
             "eos_token_id": 2}
TOKENS = jnp.array([[1, 5, 9, 3, 7, 2], [4, 8, 1, 6, 0, 0]])
SEGMENTS = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _llama(scan: bool, *, remat: str = "none", adapters: str = "both") -> Llama:
    model = Llama(dataclasses.replace(CFG, scan_layers=scan, remat=remat), rngs=nnx.Rngs(0))
    if adapters in ("both", "slim"):
        inject(model, "q_proj", SlimConfig(rank=2, num_clusters=2), rngs=nnx.Rngs(1))
    if adapters in ("both", "lora"):
        inject(model, "(down|v)_proj", LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(2))
    for _, leaf in nnx.iter_graph(model):  # non-zero B factors: every gradient path matters
        if isinstance(leaf, nnx.LoRAParam):
            leaf[...] = leaf[...] + 0.1
    return model


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    """`{per-layer path: array}`: stacked `layers/layer/...[i]` read as `layers/i/...`."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        name, value = "/".join(map(str, path)), var.get_value()
        if value is None or jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            continue
        if name.startswith("layers/layer/"):
            for i in range(value.shape[0]):
                out[name.replace("layers/layer/", f"layers/{i}/")] = np.asarray(value[i])
        else:
            out[name] = np.asarray(value)
    return out


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


@nnx.jit
def _loss_and_grads(model):
    batch = {"tokens": TOKENS, "segment_ids": SEGMENTS}

    def loss(model):
        logits = masked_batch_logits(model, batch)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -(jnp.take_along_axis(logp, TOKENS[..., None], axis=-1)[..., 0] * SEGMENTS).mean()

    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)


# remat "full" inside the scanned body is the pod presets' setting; "none" compiles a second
# scanned program (about as long again), so it is marked slow.
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_scanned_equals_unrolled_in_logits_loss_gradients_and_slim_state(remat):
    unrolled, scanned = _llama(False), _llama(True, remat=remat)
    assert isinstance(scanned.layers, LayerStack)
    assert scanned.layers.layer.self_attn.q_proj.experts_a.shape[0] == CFG.num_layers
    assert scanned.layers.layer.mlp.down_proj.lora_a.get_metadata("logical_axes")[0] == "layers"
    # the same seed gives the same weights and adapters, stacked
    _assert_same(_flat(nnx.state(unrolled)), _flat(nnx.state(scanned)))
    np.testing.assert_allclose(np.asarray(scanned(TOKENS)), np.asarray(unrolled(TOKENS)),
                               atol=1e-5)
    loss_u, grads_u = _loss_and_grads(unrolled)
    loss_s, grads_s = _loss_and_grads(scanned)
    np.testing.assert_allclose(float(loss_s), float(loss_u), atol=1e-5)
    _assert_same(_flat(grads_u), _flat(grads_s))
    # SLIM's cluster statistics and RNG counts were updated alike, token masks included
    _assert_same(_flat(nnx.state(unrolled)), _flat(nnx.state(scanned)))


def _hlo(num_layers: int, scan: bool) -> str:
    model = Llama(dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan),
                  rngs=nnx.Rngs(0))
    inject(model, "q_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: nnx.merge(graphdef, s)(TOKENS)).lower(state).as_text()


def test_scanned_program_is_one_loop_whose_size_does_not_grow_with_depth():
    two, eight = _hlo(2, True), _hlo(8, True)
    assert eight.count("stablehlo.while") == 1
    assert len(eight) < 1.1 * len(two)
    assert len(_hlo(8, False)) > 2 * len(_hlo(2, False))  # unrolled: a copy per layer


def test_injecting_into_a_scanned_model_keeps_its_base_arrays_uncopied():
    model = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    kernel = model.layers.layer.self_attn.q_proj.kernel.get_value()
    inject(model, "q_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    assert model.layers.layer.self_attn.q_proj.kernel.get_value() is kernel


def test_adapters_on_some_stacked_layers_only_are_refused():
    model = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="same adapters"):
        inject(model, "layers/0/self_attn/q_proj", LoRAConfig(rank=2), rngs=nnx.Rngs(1))


def test_adapter_spec_and_rules_see_per_layer_paths_and_an_unsplit_layers_axis():
    spec = adapter_spec(_llama(True))
    assert spec == adapter_spec(_llama(False))
    assert "layers/2/self_attn/q_proj" in [p for group in spec for p in group["layers"]]
    mesh = jax.sharding.AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    assert logical_to_spec(("layers", "embed", "heads"), (3, 16, 16), mesh) == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_from_pretrained_and_load_peft_build_the_stacked_layout_also_on_a_mesh(tmp_path, sibling):
    sibling("test_sharded_loading")._save(Llama(CFG, rngs=nnx.Rngs(3)), tmp_path, HF_CONFIG,
                                          path_to_hf_name)
    plain = Llama.from_pretrained(tmp_path)
    scanned = Llama.from_pretrained(tmp_path, scan_layers=True)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
    sharded = Llama.from_pretrained(tmp_path, scan_layers=True, mesh=mesh)
    q = sharded.layers.layer.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in q.addressable_shards} == {(3, 4, 8)}  # [3, 16, 16] over 4 x 2
    want = np.asarray(plain(TOKENS))
    np.testing.assert_allclose(np.asarray(scanned(TOKENS)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), want, atol=1e-5)
    # a PEFT adapter goes onto the mesh the same way, each factor straight into its sharding
    save_peft(_llama(True, adapters="lora"), tmp_path / "peft", base_model_name_or_path="toy")
    load_peft(plain, tmp_path / "peft")
    load_peft(sharded, tmp_path / "peft", mesh=mesh)
    b = sharded.layers.layer.self_attn.v_proj.lora_b[...]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, ("tensor", "fsdp"))
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), np.asarray(plain(TOKENS)), atol=1e-5)


def test_peft_adapter_round_trips_between_scanned_and_unrolled(tmp_path):
    trained = _llama(True, adapters="lora")
    save_peft(trained, tmp_path / "a", base_model_name_or_path="toy")
    unrolled = Llama(CFG, rngs=nnx.Rngs(0))
    paths = load_peft(unrolled, tmp_path / "a")
    assert "layers/2/mlp/down_proj" in paths
    np.testing.assert_allclose(np.asarray(unrolled(TOKENS)), np.asarray(trained(TOKENS)),
                               atol=1e-5)
    save_peft(unrolled, tmp_path / "b", base_model_name_or_path="toy")
    scanned = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    load_peft(scanned, tmp_path / "b")
    assert isinstance(scanned.layers, LayerStack)
    np.testing.assert_allclose(np.asarray(scanned(TOKENS)), np.asarray(trained(TOKENS)),
                               atol=1e-5)


def test_slim_jax_adapter_checkpoint_round_trips_between_scanned_and_unrolled(tmp_path):
    trained = _llama(True)
    _loss_and_grads(trained)  # SLIM's clusters initialised: their state must travel too
    save_adapter_checkpoint(trained, tmp_path / "a", step=1)
    unrolled = Llama(CFG, rngs=nnx.Rngs(0))  # the same base; adapters and state from the file
    load_adapter_checkpoint(unrolled, tmp_path / "a")
    _assert_same(_flat(nnx.state(trained)), _flat(nnx.state(unrolled)))
    want = np.asarray(inference_view(trained)(TOKENS))
    np.testing.assert_allclose(np.asarray(inference_view(unrolled)(TOKENS)), want, atol=1e-5)
    save_adapter_checkpoint(unrolled, tmp_path / "b", step=1)
    scanned = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    load_adapter_checkpoint(scanned, tmp_path / "b")
    _assert_same(_flat(nnx.state(trained)), _flat(nnx.state(scanned)))
    # onto a mesh: every adapter array (stacked here) in the sharding its logical axes get
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices=jax.devices()[:8])
    on_mesh = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    load_adapter_checkpoint(on_mesh, tmp_path / "b", mesh=mesh)
    b = on_mesh.layers.layer.self_attn.q_proj.experts_b[...]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, None, ("tensor", "fsdp"))
    adapters = nnx.state(on_mesh, nnx.LoRAParam)
    _assert_same(_flat(nnx.state(trained, nnx.LoRAParam)), _flat(adapters))


def test_greedy_generation_is_identical_scanned_and_unrolled():
    prompts = [[1, 5, 9, 3], [1, 7]]
    outs = [generate(inference_view(_llama(scan)), prompts, max_new_tokens=5, stop_ids=()).tokens
            for scan in (False, True)]
    assert outs[0] == outs[1]
