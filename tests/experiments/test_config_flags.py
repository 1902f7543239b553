"""Every value a config class rejects is named by the flag the user typed, in one line, exit 2,
before any work (issue 11, section 7: errors name the flag, not the field)."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import lorahub_bbh, slim_finetune, train_lora_modules
from experiments.presets import lorahub as lorahub_presets
from experiments.presets import slim as slim_presets
from slim_jax.errors import ConfigError
from slim_jax.nn import SlimConfig

# One rejected value per validated field of every config class a command builds from its flags.
BAD: dict[str, dict[str, str]] = {
    "SlimConfig": {
        "rank": "0", "alpha": "0", "init_a": "xavier", "param_dtype": "int8", "dtype": "int8",
        "num_lora_experts": "0", "num_identity_experts": "-1", "top_k": "9",
        "router_init_std": "-1", "num_clusters": "0", "momentum": "2", "yield_strength": "-1",
        "yield_threshold": "-1", "yield_quantile": "1.5", "cluster_eps": "0",
        "cluster_sigma_floor": "-1", "dropmerge_p": "1"},
    "TrainConfig": {
        "steps": "0", "grad_accum_steps": "0", "log_every": "0", "save_every": "-1",
        "keep_checkpoints": "0", "l1_coeff": "-1", "frozen_dtype": "fp8"},
    "OptimizerConfig": {
        "learning_rate": "0", "warmup_steps": "-1", "final_lr_ratio": "2", "weight_decay": "-1",
        "b1": "1", "b2": "-0.5", "eps": "0", "clip_norm": "0"},
    "ProtocolConfig": {
        "search": "nelder", "compare": "nelder", "baselines": "oracle", "objective_mode": "x",
        "k": "0", "budget": "0", "runs": "0", "modules_per_run": "0", "max_test_examples": "0",
        "max_length": "0", "max_new_tokens": "0", "generation_batch_size": "0",
        "batch_size": "0"},
    "MeshConfig": {"data": "0", "fsdp": "-2", "tensor": "0"},
    "ModelSpec": {"remat": "everything"},
    "UpstreamSpec": {
        "num_modules": "0", "max_length": "1", "num_devices": "-1", "rank": "0", "alpha": "0",
        "dropout": "1", "steps": "0", "save_every": "-1", "learning_rate": "0",
        "warmup_steps": "-1", "batch_size": "0", "targets": "(", "max_examples": "0",
        "heldout": "-1"},
}

COMMANDS = {
    "slim_finetune": (slim_finetune, slim_presets.PRESETS["cpu"]),
    "lorahub_bbh": (lorahub_bbh, lorahub_presets.PRESETS["cpu"][0]),
    "train_lora_modules": (train_lora_modules, lorahub_presets.PRESETS["cpu"][1]),
}


def sections(config, prefix=""):
    """(flag prefix, class) of every dataclass section below the root."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield f"{prefix}{f.name}.", type(value)
            yield from sections(value, f"{prefix}{f.name}.")


def cases():
    for command, (_, defaults) in COMMANDS.items():
        for prefix, cls in sections(defaults):
            for field, value in BAD.get(cls.__name__, {}).items():
                flag = "--" + (prefix + field).replace("_", "-")
                yield pytest.param(command, flag, value, id=f"{command}:{flag}")


def test_every_validating_section_is_covered():
    """A config class that validates its fields and is reachable from a command's flags has its
    rejected values listed in BAD (so a new check cannot go untested)."""
    for _, defaults in COMMANDS.values():
        for prefix, cls in sections(defaults):
            if "__post_init__" in vars(cls):
                assert cls.__name__ in BAD, f"{prefix}: {cls.__name__} validates but is not in BAD"


@pytest.mark.parametrize(("command", "flag", "value"), list(cases()))
def test_rejected_value_names_its_flag(command, flag, value, tmp_path, capsys, monkeypatch):
    module, _ = COMMANDS[command]
    empty = tmp_path / "data"
    empty.mkdir()
    # An empty data folder and a fresh --out: were the value accepted, the command would fail
    # on the data instead (another message), never start work.
    monkeypatch.setenv("SLIM_JAX_DATA_DIR", str(empty))
    argv = [flag, value, "--out", str(tmp_path / "out")]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    head = f"{module.PROG}: error: "
    # a class's check leads with the flag; tyro's own (a Literal's choices) names it inside
    assert err[0].startswith(f"{head}{flag} ") or (err[0].startswith(f"{head}invalid choice")
                                                  and f"'{flag}'" in err[0]), err[0]
    assert not (tmp_path / "out").exists()  # nothing created: checked before any work


def test_library_users_see_field_names():
    with pytest.raises(ConfigError, match=r"^top_k must be between 1") as info:
        SlimConfig(top_k=9, num_lora_experts=4, num_identity_experts=2)
    assert info.value.field == "top_k"


@pytest.mark.parametrize("command", [slim_finetune, lorahub_bbh, train_lora_modules])
def test_an_out_url_is_refused_in_one_line(command, capsys):
    """Run folders are written with local atomic renames: `--out gs://...` is an error naming
    the flag, not a local folder called `gs:`."""
    assert command.main(["--out", "gs://bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out gs://bucket/run is a URL" in err
