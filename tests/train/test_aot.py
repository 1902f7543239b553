"""Compile-only runs: the real training step compiled for a small TPU topology on this CPU host."""

from __future__ import annotations

import dataclasses
import json

import pytest
from flax import nnx

from slim_jax.errors import ConfigError
from slim_jax.nn import LoRAConfig, inject
from slim_jax.parallel import MeshConfig
from slim_jax.parallel.topology import GIB, TopologyError, topology
from slim_jax.train import TrainConfig
from slim_jax.train.aot import (
    architecture,
    compile_train_step,
    model_factory,
    report,
    summary,
)

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs jax[tpu] (libtpu)")

SMALL = dict(architecture("llama-3-8b"), vocab_size=512, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BATCH, SEQ = 8, 32


def _model() -> nnx.Module:
    def make():
        model = model_factory(SMALL)()
        inject(model, r"(q|v)_proj$", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
        return model

    return nnx.eval_shape(make)


@pytest.fixture(scope="module")
def v5e4_report():
    config = TrainConfig(steps=10, frozen_dtype="bfloat16", mesh=MeshConfig(data=1, fsdp=-1))
    return compile_train_step(_model(), topology("v5e-4"), config, batch_size=BATCH, seq_len=SEQ)


def test_topologies_have_their_chips_and_memory():
    for name, chips, kind, hbm in [("v5e-4", 4, "TPU v5 lite", 16), ("v4-32", 16, "TPU v4", 32),
                                   ("v5p-64", 32, "TPU v5", 95), ("v5e-256", 256, "TPU v5 lite",
                                                                  16)]:
        t = topology(name)
        assert (len(t.devices), t.device_kind, t.hbm_bytes // GIB) == (chips, kind, hbm)
        assert t.peak_flops > 1e14
    with pytest.raises(TopologyError, match="unknown topology"):
        topology("v9-8")
    with pytest.raises(TopologyError, match="v4-8, v4-16"):
        topology("v4-6")


def test_train_step_compiles_for_v5e_4_and_reports_per_chip(v5e4_report):
    r = v5e4_report
    assert r.topology.name == "v5e-4" and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    model = _model()
    frozen = sum(x.size for x in jax_leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    # Frozen base in bf16, split over the 4 chips (every matrix divides by 4; norms replicate).
    assert r.held["frozen"] == pytest.approx(frozen * 2 / 4, rel=0.05)
    assert r.held["optimizer"] >= 2 * r.held["adapters"] > 0  # Adam's two moments
    assert r.held["batch"] == (4 * 4 + 4) * BATCH * SEQ // 4  # 4 int32 keys + a float mask
    assert r.temp_bytes >= 0 and r.total_bytes >= sum(r.held.values())
    assert r.flops > 0 and r.fits and r.flops_exact
    assert r.mfu_bound > 0 and r.step_s_at_peak == r.flops / 197e12
    lines = []
    assert report([r], lines.append) == 0
    assert lines[-1].startswith("fits: ") and lines[-1].endswith(" of 16.0 GiB per chip")


def test_a_program_larger_than_the_chip_does_not_fit(v5e4_report):
    tiny = dataclasses.replace(v5e4_report.topology, hbm_bytes=1024)
    code, last = summary([dataclasses.replace(v5e4_report, topology=tiny)])
    assert code == 1 and last.startswith("does not fit: train step needs ")


def test_abstract_model_takes_config_overrides_and_refuses_unknown_ones():
    model = nnx.eval_shape(model_factory(SMALL, overrides={"num_layers": 1}))
    assert len(model.layers) == 1
    with pytest.raises(ConfigError, match="LlamaConfig has no field 'not_a_field'"):
        model_factory(SMALL, overrides={"not_a_field": True})


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_architecture_reads_a_config_json_through_epath(tmp_path):
    # The same code reads gs://bucket/model (etils.epath); a local folder and file here.
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert architecture(str(tmp_path)) == SMALL
    assert architecture(str(tmp_path / "config.json")) == SMALL
    with pytest.raises(ConfigError, match="neither built in"):
        architecture(str(tmp_path / "missing"))


def test_slim_finetune_compile_only_reports_and_exits_by_fit(tmp_path, capsys):
    from experiments.slim_finetune import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    args = ["--preset", "pod_multi", "--model.path", str(tmp_path), "--methods", "lora",
            "--data.batch-size", "8", "--data.seq-len", "32", "--compile-only", "true"]
    assert main([*args, "--topology", "cpu-8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("lora train step on cpu-8 (8 x cpu")
    assert out[-1].startswith("fits: ") and out[-1].endswith("GiB per chip")
    assert main([*args, "--topology", "v9-1"]) == 2  # a bad name: one line, exit 2
    assert "unknown topology 'v9-1'" in capsys.readouterr().err


def test_a_program_xla_refuses_for_memory_is_reported_as_not_fitting():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from slim_jax.parallel import make_mesh
    from slim_jax.train.aot import compile_program

    topo = topology("v5e-4")
    mesh = make_mesh(MeshConfig(data=1), topo.devices[:1])
    x = jax.ShapeDtypeStruct((2**20,), jnp.float32)
    # A sorted [2^20, 2^12] float32 outer product: 16 GiB, twice over, in temporaries.
    r = compile_program("big", lambda x: jnp.sort(jnp.outer(x, x[:2**12]), axis=0), (x,),
                        (NamedSharding(mesh, PartitionSpec()),), topo, mesh, kinds={"x": 2**22})
    assert not r.fits and r.temp_bytes > 16 * GIB and r.step_s_at_peak is None
    assert "not compiled" in r.lines()[2]
    code, last = summary([r])
    assert code == 1 and last.startswith("does not fit: big needs ")


def test_a_program_over_part_of_a_v5e_64_slice_is_one_clear_error():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from slim_jax.parallel import make_mesh
    from slim_jax.train.aot import compile_program

    topo = topology("v5e-64")  # XLA: "device assignment should include all slice devices"
    x = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    for n, ok in ((1, True), (64, True), (16, False)):
        mesh = make_mesh(MeshConfig(data=n), topo.devices[:n])
        args = ("toy", lambda x: x * 2, (x,), (NamedSharding(mesh, PartitionSpec("data")),),
                topo, mesh)
        if ok:
            assert compile_program(*args, kinds={}).fits
        else:
            with pytest.raises(ConfigError, match=r"^toy: XLA compiles multi-chip programs for "
                               r"v5e-64 only over all 64 chips \(limited ICI routing\); this "
                               r"one spans 16$"):
                compile_program(*args, kinds={})


def test_a_batch_the_topology_cannot_split_is_one_clear_error():
    from slim_jax.parallel.sharding import BatchSizeError

    config = TrainConfig(steps=10, frozen_dtype="bfloat16", mesh=MeshConfig(data=1, fsdp=-1))
    with pytest.raises(BatchSizeError, match="use a multiple of 4"):
        compile_train_step(_model(), topology("v5e-4"), config, batch_size=6, seq_len=SEQ)


def test_scanned_train_step_counts_every_layer_like_the_unrolled_one_on_v5e_4():
    # XLA counts the scanned layer body once; compile-only counts it per layer (the TPU
    # program's loop condition gives the trip count), so both layouts report the same step.
    def make(scan):
        def build():
            model = model_factory(SMALL, overrides={"scan_layers": scan, "num_layers": 3})()
            inject(model, r"(q|v)_proj$", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
            return model

        return nnx.eval_shape(build)

    config = TrainConfig(steps=10, frozen_dtype="bfloat16", mesh=MeshConfig(data=1, fsdp=-1))
    scanned, unrolled = (compile_train_step(make(scan), topology("v5e-4"), config, batch_size=BATCH,
                                            seq_len=SEQ) for scan in (True, False))
    assert scanned.fits and scanned.flops_exact and scanned.mfu_bound > 0
    assert scanned.xla_flops < 0.7 * scanned.flops  # XLA alone: one of the three layers
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.05)
    assert "XLA's count, loop bodies once" in scanned.lines()[2]
