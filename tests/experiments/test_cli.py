"""The experiments' command lines (tyro over the config dataclasses, with presets)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from experiments.cli import field_docs, parse_config
from slim_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Inner:
    """Attributes:
      rate: step size. Not in the help.
      mode: how.
    """

    rate: float = 0.1
    mode: Literal["fast", "slow"] = "fast"

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError(f"--inner.rate must be > 0, got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Outer:
    """Attributes:
      preset: the preset.
      names: which ones.
      limit: a cap, or none.
      flag: on or off.
      pairs: pairs.
      inner: nested.
    """

    preset: str = "a"
    names: tuple[str, ...] = ("a", "b")
    limit: int | None = 3
    flag: bool = False
    pairs: tuple[tuple[str, int], ...] = (("x", 1),)
    inner: Inner = dataclasses.field(default_factory=Inner)


PRESETS = {"a": Outer(), "b": Outer(limit=7)}


def parse(argv):
    return parse_config("demo", "demo: a demo.", PRESETS, argv, default_preset="a")


def test_every_field_is_a_flag_with_its_type():
    config = parse(["--names", "x,y", "--limit", "none", "--flag", "yes",
                    "--pairs", '[["z", 2]]', "--inner.rate", "0.5", "--inner.mode", "slow"])
    assert config == Outer(names=("x", "y"), limit=None, flag=True, pairs=(("z", 2),),
                           inner=Inner(rate=0.5, mode="slow"))
    assert parse([]) == Outer()


def test_a_preset_gives_the_defaults_and_flags_override_it():
    assert parse(["--preset", "b"]) == Outer(preset="b", limit=7)
    assert parse(["--preset", "b", "--limit", "2"]).limit == 2
    with pytest.raises(ConfigError, match="unknown preset 'c'; choose from a, b"):
        parse(["--preset", "c"])


def test_help_shows_one_line_per_field_with_the_preset_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--preset", "b", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "  --inner.rate FLOAT  step size. [default: 0.1]" in text
    assert "  --limit INT|none  a cap, or none. [default: 7]" in text
    assert "--names A,B,...  which ones. [default: a,b]" in text
    assert "Not in the help" not in text and text.count("--inner.rate") == 1
    assert field_docs(Outer)["inner"] == "nested."


@pytest.mark.parametrize("argv", [["--flag", "maybe"], ["--inner.mode", "medium"],
                                  ["--limit", "many"], ["--unknown", "1"],
                                  ["--inner.rate", "-1"], ["--inner_rate", "1"]])
def test_bad_values_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("demo: error:")
    if argv[0] == "--inner.rate":
        assert "--inner.rate must be > 0, got -1.0" in err


@pytest.mark.parametrize("module", ["slim_finetune", "lorahub_bbh", "train_lora_modules"])
def test_each_command_help_is_short_and_lists_each_flag_once(module):
    done = subprocess.run([sys.executable, "-m", f"experiments.{module}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) < 150
    flags = [line.split()[0] for line in lines if line.startswith("  --")]
    assert len(flags) == len(set(flags)) and "--preset" in flags and "--out" in flags
    assert all("_" not in flag for flag in flags)
    assert all(line.split("  ", 2)[-1].strip()[0] != "[" for line in lines
               if line.startswith("  --"))  # every field has a sentence of its own


def test_library_argument_names_in_errors_become_the_commands_flags(capsys):
    from experiments.cli import run_command
    from slim_jax.errors import CheckpointError

    def run(config, args, stop):
        raise CheckpointError("m/adapter_model.bin is a pickle; pass allow_pickle=True if trusted")

    flags = {"allow_pickle=True": "--modules.allow-pickle"}
    assert run_command("demo", [], lambda args: None, run, flags=flags) == 2
    err = capsys.readouterr().err
    assert err == ("demo: error: m/adapter_model.bin is a pickle; pass --modules.allow-pickle "
                   "if trusted\n")
