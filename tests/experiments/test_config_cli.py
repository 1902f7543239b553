"""The dataclass -> command-line generator shared by the experiments."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from experiments.config_cli import (
    OneLineParser,
    add_config_arguments,
    field_docs,
    parse_config,
    parse_value,
)
from slim_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    """Attributes:
      rate: step size.
      mode: how.
    """

    rate: float = 0.1
    mode: Literal["fast", "slow"] = "fast"

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError(f"rate must be > 0, got {self.rate}")


@dataclasses.dataclass(frozen=True)
class Outer:
    """Attributes:
      names: which ones.
      limit: a cap, or none.
      flag: on or off.
      inner: nested.
    """

    names: tuple[str, ...] = ("a", "b")
    limit: int | None = 3
    flag: bool = False
    pairs: tuple[tuple[str, int], ...] = (("x", 1),)
    inner: Inner = dataclasses.field(default_factory=Inner)


def parse(argv, exclude=()):
    parser = OneLineParser(prog="demo")
    add_config_arguments(parser, Outer(), exclude=exclude)
    return parse_config(parser, Outer(), argv, exclude=exclude)


def test_every_field_is_a_flag_with_its_type():
    config = parse(["--names", "x,y", "--limit", "none", "--flag", "yes",
                    "--pairs", '[["z", 2]]', "--inner.rate", "0.5", "--inner.mode", "slow"])
    assert config == Outer(names=("x", "y"), limit=None, flag=True, pairs=(("z", 2),),
                           inner=Inner(rate=0.5, mode="slow"))
    assert parse([]) == Outer()


def test_help_shows_docs_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = capsys.readouterr().out
    assert "--inner.rate FLOAT" in text and "step size. [float; default: 0.1]" in text
    assert "--limit INT|none" in text and "default: a,b" in text
    assert field_docs(Outer)["inner"] == "nested."


@pytest.mark.parametrize("argv", [["--flag", "maybe"], ["--inner.mode", "medium"],
                                  ["--limit", "many"], ["--unknown", "1"]])
def test_bad_values_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("demo: error:")


def test_validation_runs_on_overrides_and_excluded_fields_stay():
    with pytest.raises(ConfigError, match="rate must be > 0"):
        parse(["--inner.rate", "-1"])
    with pytest.raises(SystemExit):
        parse(["--flag", "true"], exclude=(("flag",),))


def test_parse_value_falls_back_to_text():
    assert parse_value("float32", object) == "float32"
    assert parse_value("[1, [2, 3]]", object) == (1, (2, 3))
