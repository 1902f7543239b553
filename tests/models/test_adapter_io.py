"""Adapter detection, the adapter spec, and slim_jax adapter checkpoints restored onto a model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slim_jax.checkpoint import Checkpointer
from slim_jax.errors import CheckpointError
from slim_jax.models import adapter_io
from slim_jax.nn import (
    AdapterParam,
    ClusterState,
    LoRAConfig,
    SlimConfig,
    adapted_layers,
    inject,
)

LORA = LoRAConfig(rank=2, alpha=6, dropout=0.1, param_dtype=jnp.bfloat16)
SLIM = SlimConfig(num_lora_experts=2, num_identity_experts=1, top_k=2, rank=2, alpha=4,
                  num_clusters=3, dropmerge_p=0.1)


class Net(nnx.Module):
    """`depth` linear layers of width 4 (one width: eager initialisers compile once)."""

    def __init__(self, depth: int = 3):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(depth)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _adapted(seed: int = 0) -> Net:
    """A net with LoRA (with dropout) on layer 0 and SLIM on layers 1, 2, every adapter array and
    cluster statistic set to seed-dependent values."""
    net = Net()
    inject(net, "layers/0", LORA, rngs=nnx.Rngs(1))
    inject(net, "layers/(1|2)", SLIM, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(seed)
    for _, var in _trained_variables(net):
        var.set_value(jnp.asarray(rng.uniform(0.0, 10.0, var.shape).astype(var.dtype)))
    return net


def _trained_variables(net: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    return [("/".join(map(str, path)), var) for path, var in nnx.iter_graph(net)
            if isinstance(var, AdapterParam | ClusterState)]


def _arrays(net: nnx.Module) -> dict[str, np.ndarray]:
    return {path: np.asarray(var.get_value()) for path, var in _trained_variables(net)}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ------------------------------------------------------------------------------------ detection


def test_find_adapter_detects_each_layout(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    assert adapter_io.find_adapter(tmp_path / "peft").format == "peft"
    checkpoints = tmp_path / "run" / "checkpoints"
    adapter_io.save_adapter_checkpoint(_adapted(), checkpoints, step=3)
    adapter_io.save_adapter_checkpoint(_adapted(), checkpoints, step=8)
    latest = adapter_io.AdapterSource("slim_jax", checkpoints)
    assert adapter_io.find_adapter(checkpoints) == latest
    assert adapter_io.find_adapter(tmp_path / "run") == latest  # a training run folder
    assert adapter_io.find_adapter(checkpoints / "3") == adapter_io.AdapterSource(
        "slim_jax", checkpoints, 3)


def test_find_adapter_names_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match=r"'.*nothing-here' does not exist; expected a PEFT"):
        adapter_io.find_adapter(tmp_path / "nothing-here")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; expected a PEFT adapter directory"):
        adapter_io.find_adapter(tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"is not an adapter: .*slim_jax checkpoint "
                                              r"directory.*it holds weights\.safetensors"):
        adapter_io.find_adapter(tmp_path)


def test_hub_adapter_id_offline_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'lorahub/flan_t5_large-wiqa'.*offline.*Missing "
                                              r"files: adapter_config\.json"):
        adapter_io.find_adapter("lorahub/flan_t5_large-wiqa")


# ------------------------------------------------------------------------------ the adapter spec


def test_adapter_spec_round_trips_through_json():
    spec = adapter_io.adapter_spec(_adapted())
    assert [(g["adapter"], g["layers"]) for g in spec] == [
        ("lora", ["layers/0"]), ("slim", ["layers/1", "layers/2"])]
    assert spec[0]["config"]["param_dtype"] == "bfloat16" and spec[1]["config"]["top_k"] == 2
    fresh = Net()
    assert adapter_io.inject_spec(fresh, json.loads(json.dumps(spec))) == [
        "layers/0", "layers/1", "layers/2"]
    assert adapter_io.adapter_spec(fresh) == spec
    assert adapted_layers(fresh)["layers/1"].config == SLIM


@pytest.mark.parametrize(("spec", "message"), [
    ([], "must be a non-empty list of groups"),
    ([{"adapter": "dora", "config": {}, "layers": ["layers/0"]}],
     r"adapter 'dora'; accepted: 'lora', 'slim'"),
    ([{"adapter": "lora", "config": {"rank": 2, "lora_alpha": 4}, "layers": ["layers/0"]}],
     r"\(LoRAConfig\) has unknown fields \['lora_alpha'\]"),
    ([{"adapter": "lora", "config": {"rank": 0}, "layers": ["layers/0"]}],
     "rank must be an integer >= 1"),
    ([{"adapter": "lora", "config": {}, "layers": ["layers/0", "layers/0"]}],
     "lists layer 'layers/0' twice"),
    ([{"adapter": "lora", "config": {}, "layers": ["layers/7"]}],
     r"puts adapters on 1 layer\(s\) this Net does not have: layers/7"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(CheckpointError, match=message):
        adapter_io.inject_spec(Net(), spec)


# ------------------------------------------------------------------------- slim_jax checkpoints


def test_checkpoint_restores_adapters_and_cluster_state_of_the_chosen_step(tmp_path):
    first, second = _adapted(seed=1), _adapted(seed=2)
    adapter_io.save_adapter_checkpoint(first, tmp_path, step=1)
    adapter_io.save_adapter_checkpoint(second, tmp_path, step=2, meta={"note": "kept"})
    latest = Net()
    assert adapter_io.load_adapter_checkpoint(latest, tmp_path) == [
        "layers/0", "layers/1", "layers/2"]
    _assert_same(_arrays(latest), _arrays(second))
    assert latest.layers[0].lora_a.dtype == jnp.bfloat16
    earlier = Net()
    adapter_io.attach_adapter(earlier, tmp_path / "1")
    _assert_same(_arrays(earlier), _arrays(first))
    # The RNG streams come back too: dynamic merging draws the same masks.
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    infer = nnx.jit(lambda net, x: net(x))
    view = lambda net: nnx.view(net, deterministic=True, use_running_average=True)
    np.testing.assert_array_equal(infer(view(latest), x), infer(view(second), x))
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.restore_meta()["note"] == "kept"


def test_checkpoint_without_a_spec_needs_the_adapters_injected(tmp_path):
    trained = _adapted(seed=3)
    # What a training run writes (Trainer.checkpoint_items): no adapter spec in the metadata.
    _, params, _, mutable = nnx.split(trained, nnx.LoRAParam, nnx.Param, ...)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(4, {"adapters": params, "state": mutable, "optimizer": {}})
    with pytest.raises(CheckpointError, match=r"\(step 4\) does not record which adapter each "
                                              r"layer carries.*on 3 layer\(s\): layers/0, "
                                              r"layers/1, layers/2"):
        adapter_io.load_adapter_checkpoint(Net(), tmp_path)
    net = Net()
    inject(net, "layers/0", LORA, rngs=nnx.Rngs(0))
    inject(net, "layers/(1|2)", SLIM, rngs=nnx.Rngs(0))
    adapter_io.load_adapter_checkpoint(net, tmp_path)
    _assert_same(_arrays(net), _arrays(trained))
    wrong = Net()
    inject(wrong, "layers/0", LoRAConfig(rank=3, alpha=6, dropout=0.1), rngs=nnx.Rngs(0))
    inject(wrong, "layers/(1|2)", SLIM, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"adapter array 'layers/0/lora_a': .* has shape "
                                              r"\(4, 2\), this Net needs \(4, 3\)"):
        adapter_io.load_adapter_checkpoint(wrong, tmp_path)


def test_mismatched_models_and_saves_are_named(tmp_path):
    adapter_io.save_adapter_checkpoint(_adapted(), tmp_path, step=0)
    other = Net()
    inject(other, "layers/0", LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"adapters differ from those of .* at layer "
                                              r"'layers/0': the model has LoRAConfig\(rank=4"):
        adapter_io.load_adapter_checkpoint(other, tmp_path)
    with pytest.raises(CheckpointError, match=r"this Net does not have: layers/2 \(is it for "
                                              r"another base model"):
        adapter_io.load_adapter_checkpoint(Net(depth=2), tmp_path)
    with pytest.raises(CheckpointError, match="already holds a checkpoint at step 0"):
        adapter_io.save_adapter_checkpoint(_adapted(), tmp_path, step=0)
    with pytest.raises(CheckpointError, match="has no adapters to save"):
        adapter_io.save_adapter_checkpoint(Net(), tmp_path / "x")
    with pytest.raises(CheckpointError, match="is not a slim_jax checkpoint directory"):
        adapter_io.load_adapter_checkpoint(Net(), tmp_path / "x")
