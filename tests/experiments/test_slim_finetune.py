"""`python -m experiments.slim_finetune`: a shortened cpu preset through every method, the
identity-only check, the command line and its one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.base_model import load_base
from experiments.slim_finetune import PROG, main, parse_cli
from experiments.slim_methods import METHODS, make_method, target_shapes
from experiments.slim_setup import resolve_inputs
from slim_jax.checkpoint import Checkpointer
from slim_jax.eval import StoryCapability
from slim_jax.models.peft_io import load_peft_factors
from slim_jax.nn import SlimLinear, adapted_layers, inference_view, inject
from slim_jax.train import Trainer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("quick_compile")
# The cpu preset (real TinyStories model, real AG News data), shortened: 3 steps, 8 test
# examples, 4 short stories, adapters on two layers of the last block (so that the backward pass,
# and its compilation, stops there) to keep six methods quick.
SHORT = ["--seeds", "0", "--train.steps", "3", "--train.log-every", "1",
         "--task.max-train", "48", "--task.max-test", "8", "--data.batch-size", "8",
         "--data.seq-len", "64", "--eval.max-length", "64", "--eval.max-new-tokens", "4",
         "--eval.batch-size", "8", "--general.num-stories", "4", "--general.story-tokens", "24",
         "--targets", "layers/4/(self_attn/q_proj|mlp/down_proj)$", "--num-devices", "1",
         "--compilation-cache", "none", "--workers", "2"]


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slim") / "run"
    argv = [*SHORT, "--eval.curve-every", "2", "--out", str(out), "--data-dir", str(shared_data)]
    assert main(argv) == 0
    return out, argv


def test_every_method_writes_parseable_outputs(run, shared_data):
    out, argv = run
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["summary"]] == list(METHODS)
    assert results["base"]["general"]["top1_agreement"] == 1.0
    for record in results["runs"]:
        assert record["steps"] == 3 and 0.0 <= record["downstream"] <= 1.0
        assert 0.0 <= record["downstream_likelihood"] <= 1.0
        assert set(record["general"]) == {"nll", "perplexity", "top1_agreement", "kl_to_base"}
        assert record["forgetting"] == pytest.approx(
            record["general"]["nll"] - results["base"]["general"]["nll"])
        run_dir = out / "runs" / record["method"] / "seed0"
        assert json.loads((run_dir / "result.json").read_text()) == record
        predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 8 and "predicted" in json.loads(predictions[0])
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
        assert Checkpointer(run_dir / "checkpoints").all_steps() == [3]
        # --eval.curve-every 2: points at steps 2 and 3; the last, on all 8 test examples (fewer
        # than --eval.curve-examples), is the final evaluation itself.
        assert [p["step"] for p in record["curve"]] == [2, 3]
        assert record["curve"][-1]["downstream"] == record["downstream"]
        assert record["curve"][-1]["forgetting"] == pytest.approx(record["forgetting"], abs=1e-6)
        assert len((run_dir / "evals.jsonl").read_text().splitlines()) == 2
    table = (out / "results.md").read_text()
    assert all(f"| `{m}` | 1 |" in table for m in METHODS) and "| base model |" in table
    assert "downstream acc by likelihood (%)" in table
    along = results["curve_comparison"]  # None only when some method never forgot
    assert along is None or [row["method"] for row in along["rows"]] == list(METHODS)
    assert (along is not None) == ("## Along training" in table)
    for image in ("loss_curves.png", "tradeoff.png"):
        assert (out / image).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["methods"] == list(METHODS)
    assert shlex.split((out / "command.txt").read_text()) == [
        "python", "-m", "experiments.slim_finetune", *argv]
    # Plain LoRA, matched to SLIM's parameter count, is exported in PEFT's format.
    lora = next(r for r in results["runs"] if r["method"] == "lora")
    slim = next(r for r in results["runs"] if r["method"] == "slim")
    assert abs(lora["trainable_params"] - slim["trainable_params"]) < 0.1 * slim[
        "trainable_params"]
    model, _, _ = load_base("tinystories260k", str(shared_data), dtype="float32",
                            param_dtype="float32")
    peft_config, factors = load_peft_factors(out / "runs/lora/seed0/peft", model)
    assert peft_config.rank == lora["adapter"]["rank"] and len(factors) == 2


def test_identity_only_routing_leaves_general_capability_unchanged(run, shared_data):
    """Route every token of the trained SLIM model to its identity experts: the LoRA experts get
    exactly zero weight and its general capability is the base model's (the run's own base
    record), while the same adapters with their trained routing do change it.

    The adapted graph is compiled differently from the base one, so logits may differ in the last
    float32 bit (KL ~ 1e-9): measures are compared to 1e-6, agreement exactly."""
    out, argv = run
    config = parse_cli(argv)
    folder = resolve_inputs(config)
    load = lambda: load_base(config.model.path, str(folder), dtype="float32",
                             param_dtype="float32")[:2]
    base, tokenizer = load()
    stories = json.loads((out / "stories.json").read_text())["stories"]
    capability = StoryCapability(inference_view(base), tokenizer, stories)
    base_general = json.loads((out / "results.json").read_text())["base"]["general"]
    assert capability.measure(inference_view(base)) == base_general

    model, _ = load()
    method = make_method("slim", config.slim, target_shapes(model, config.targets))
    inject(model, config.targets, method.adapter, rngs=nnx.Rngs(0))
    trainer = Trainer(model, dataclasses.replace(config.train, run_dir=None),
                      devices=jax.devices()[:1])
    trainer.restore(Checkpointer(out / "runs/slim/seed0/checkpoints"))
    trained = inference_view(trainer.model())
    layers = [m for m in adapted_layers(trained).values() if isinstance(m, SlimLinear)]
    assert len(layers) == 2 and config.slim.top_k <= config.slim.num_identity_experts
    # Every token well inside its cluster (no yielding): the trained LoRA experts get weight and
    # change the capability. (With the trained clusters, story tokens may all lie far outside the
    # task's clusters after 3 steps and yield already, so the contrast is made explicit.)
    trained_var = [layer.cluster_var[...] for layer in layers]
    for layer in layers:
        layer.cluster_var[...] = jnp.full_like(layer.cluster_var[...], 1e12)
    assert capability.measure(trained) != base_general
    for layer, var in zip(layers, trained_var, strict=True):
        layer.cluster_var[...] = var

    # Every token far from every cluster centre: yielding sends all weight to identity experts.
    for layer in layers:
        layer.cluster_mean[...] = jnp.full_like(layer.cluster_mean[...], 1e6)
    x = jax.random.normal(jax.random.key(0), (2, 5, max(m.in_features for m in layers)))
    for layer in layers:
        gates = np.asarray(layer.routing_weights(x[..., :layer.in_features]))
        assert (gates[..., :config.slim.num_lora_experts] == 0).all()
    identity_only = capability.measure(trained)
    assert identity_only["top1_agreement"] == 1.0
    assert identity_only == pytest.approx(base_general, rel=1e-6, abs=1e-6)


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_cli(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--methods", "--seeds", "--out", "--slim.dropmerge-p",
                 "--train.optimizer.learning-rate", "--train.mesh.fsdp", "--eval.mode"):
        assert flag in text
    assert "default: 0.1" in text and "default: 0,1,2" in text


def test_pod_preset_and_overrides_parse():
    config = parse_cli(["--preset", "pod_multi", "--model.path", "/ckpt/llama", "--slim.top-k",
                        "3", "--train.mesh.fsdp", "4", "--methods", "slim,lora"])
    assert config.preset == "pod_multi" and config.model.path == "/ckpt/llama"
    assert config.task.names == ("openbookqa", "social_i_qa", "boolq")
    assert config.general.benchmarks == ("mmlu", "gsm8k", "piqa")
    assert (config.slim.top_k, config.train.mesh.fsdp, config.methods) == (3, 4, ("slim", "lora"))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--preset", "laptop"], "unknown preset 'laptop'"),
    (["--methods", "slim,moe"], "unknown method(s) 'moe'"),
    (["--data-dir", "{empty}"], "has no t0_templates/*.jsonl: point --data-dir"),
    (["--data-dir", "{empty}/nowhere"], "does not exist"),
    (["--task.names", "ag_news_clasify"], "--task.names: unknown T0 template 'ag_news_clasify'; "
                                          "known ones include ag_news_classify"),
    (["--model.path", "/no/such/model"], "--model.path /no/such/model does not exist"),
    (["--model.path", "./no/such/hf"], "--model.path ./no/such/hf does not exist"),
    (["--slim.top-k", "9"], "--slim.top-k must be between 1"),
    (["--task.kind", "gsm8k", "--task.validation", "yes"], "drop --task.validation"),
    (["--data.batch-size", "0"], "--data.batch-size must be >= 1, got 0"),
    (["--eval.batch-size", "0"], "--eval.batch-size must be >= 1, got 0"),
    (["--eval.max-new-tokens", "300"], "--eval.max-new-tokens (300) must be below "
                                       "--eval.max-length"),
    (["--data.seq-len", "4096"], "--data.seq-len 4096 exceeds the model's 512 positions"),
    (["--out", "{file}"], "is a file"),
    (["--out", "/proc/no/such"], "cannot create or write"),
])
def test_bad_input_is_one_line(argv, expected, tmp_path, shared_data, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{empty}", str(tmp_path)).replace("{file}", str(tmp_path / "file"))
            for a in argv]
    if "--data-dir" not in argv:
        argv += ["--data-dir", str(shared_data)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main([*argv, "--compilation-cache", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and err.startswith(f"{PROG}: error:")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_bad_flag_values_are_one_line(capsys):
    for argv in (["--train.steps", "many"], ["--eval.mode", "vote"], ["--no-such-flag", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_cli(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_the_command_fails_without_a_traceback(shared_data):
    env = {**os.environ, "SLIM_JAX_DATA_DIR": str(shared_data), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "experiments.slim_finetune", "--methods",
                           "slim,nope"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{PROG}: error: unknown method(s) 'nope'; choose from {', '.join(METHODS)}"]
