"""Command lines generated from frozen dataclasses: every field a flag, `--help` from the code.

A config is a tree of frozen dataclasses. Each leaf field becomes `--path.to.field` (underscores may
be written as dashes: `--train.optimizer.learning-rate`), its help text comes from the `Attributes:`
block of its class docstring, and its default is the value in the config given (a preset), so
`--help` and the code never disagree. Values are parsed from the field's type annotation:

- `int`, `float`, `str`; `bool` as true/false/yes/no/1/0;
- `X | None`: `none` gives None;
- `tuple[T, ...]`: comma-separated (`--seeds 0,1,2`), or a JSON list;
- `Literal[...]`: one of the listed values;
- anything else: JSON (lists become tuples), falling back to the plain string.

Parsing errors print one line (`prog: error: ...`) and exit with status 2, without a traceback.

>>> import dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Inner:
...     '''Attributes:
...       rate: the learning rate.'''
...     rate: float = 0.1
>>> @dataclasses.dataclass(frozen=True)
... class Outer:
...     seeds: tuple[int, ...] = (0,)
...     inner: Inner = Inner()
>>> parser = OneLineParser(prog="demo")
>>> add_config_arguments(parser, Outer())
>>> parse_config(parser, Outer(), ["--seeds", "1,2", "--inner.rate", "0.5"])
Outer(seeds=(1, 2), inner=Inner(rate=0.5))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any, NoReturn, TypeVar

from slim_jax.errors import ConfigError
from slim_jax.settings import DATA_DIR_ENV

NONE = "none"
TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off")
C = TypeVar("C")


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One command-line field: its path in the config tree, type, current value and help."""

    path: tuple[str, ...]
    annotation: Any
    value: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + ".".join(self.path)

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def field_docs(cls: type) -> dict[str, str]:
    """Help text per field from the `Attributes:` block of a class docstring.

    Entries read `name: text` (or `a, b: text` for several fields), continued on more deeply
    indented lines.

    >>> class C:
    ...     '''Attributes:
    ...       rate: step size,
    ...         per update.
    ...       b1, b2: Adam decays.'''
    >>> field_docs(C)
    {'rate': 'step size, per update.', 'b1': 'Adam decays.', 'b2': 'Adam decays.'}
    """
    doc = (cls.__doc__ or "").expandtabs()
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    indent = None
    entry = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = entry.match(line)
        if match and (indent is None or depth == indent):
            indent = depth
            current = [n.strip() for n in match.group(2).split(",") if n.strip()]
            for name in current:
                docs[name] = match.group(3).strip()
        elif indent is not None and depth > indent and current:
            for name in current:
                docs[name] = (docs[name] + " " + line.strip()).strip()
        elif indent is not None and depth < indent:
            break
    return docs


def _inferred(value: Any) -> Any:
    """A type annotation read off a value (for classes whose annotations cannot be resolved)."""
    if isinstance(value, tuple):
        kinds = {type(v) for v in value}
        return tuple[kinds.pop(), ...] if len(kinds) == 1 else tuple
    return Any if value is None else type(value)


def _hints(config: Any) -> dict[str, Any]:
    """Field annotations of a dataclass instance, resolved; read off the values if they cannot
    be (a class defined where its annotations' names are not importable)."""
    cls = type(config)
    module = sys.modules.get(cls.__module__)
    try:
        return typing.get_type_hints(cls, globalns=vars(module) if module else None)
    except (NameError, TypeError):
        return {f.name: _inferred(getattr(config, f.name)) for f in dataclasses.fields(config)}


def leaves(config: Any, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf field of a dataclass tree, depth first in field order."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"expected a dataclass instance, got {type(config).__name__}")
    hints, docs = _hints(config), field_docs(type(config))
    found = []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.extend(leaves(value, (*prefix, f.name)))
        else:
            found.append(Leaf((*prefix, f.name), hints.get(f.name, Any), value,
                              docs.get(f.name, "")))
    return found


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return functools.reduce(operator.or_, args), optional
    return annotation, False


def _simple(args: Sequence[Any]) -> bool:
    """Whether tuple items of these types read from comma-separated text (else JSON)."""
    return not args or args[0] in (int, float, str, bool) or (
        typing.get_origin(args[0]) is typing.Literal)


def parse_value(text: str, annotation: Any) -> Any:
    """`text` as a value of type `annotation` (see the module docstring).

    >>> parse_value("1,2", tuple[int, ...]), parse_value("none", float | None)
    ((1, 2), None)
    >>> parse_value("yes", bool), parse_value('[["a", 1]]', typing.Any)
    (True, (('a', 1),))
    """
    annotation, optional = _strip_optional(annotation)
    if optional and text.strip().lower() == NONE:
        return None
    origin = typing.get_origin(annotation)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in TRUE or lowered in FALSE:
            return lowered in TRUE
        raise ValueError(f"expected a boolean ({'/'.join(TRUE + FALSE)}), got {text!r}")
    if annotation in (int, float, str):
        return annotation(text)
    if origin is typing.Literal:
        options = typing.get_args(annotation)
        for option in options:
            if str(option) == text:
                return option
        raise ValueError(f"expected one of {', '.join(map(str, options))}, got {text!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if text.strip().startswith("["):
            return _tuple(json.loads(text))
        if not text.strip():
            return ()
        if not _simple(args[:1]):
            return _tuple(json.loads(text))
        item = args[0] if args else str
        return tuple(parse_value(part.strip(), item) for part in text.split(","))
    try:
        return _tuple(json.loads(text))
    except json.JSONDecodeError:
        return text


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and all(isinstance(v, int | float | str) for v in value):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return name or str(annotation).replace("typing.", "")


def _metavar(annotation: Any) -> str:
    inner, optional = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    if inner in (int, float, str, bool):
        name = inner.__name__.upper()
    elif origin is typing.Literal:
        name = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
    elif origin is tuple and _simple(typing.get_args(inner)[:1]):
        name = "A,B,..."
    else:
        name = "JSON"
    return f"{name}|none" if optional else name


def add_config_arguments(parser: argparse.ArgumentParser, config: Any, *,
                         exclude: Collection[tuple[str, ...]] = (),
                         group_titles: dict[str, str] | None = None) -> None:
    """Add one flag per leaf field of `config`, defaults shown from `config` itself.

    Leaves under a top-level field `x` go to an argument group titled `x` (or
    `group_titles["x"]`); top-level leaves go to the group "run". Paths in `exclude` get no flag
    (fields the program sets itself).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves(config):
        if leaf.path in exclude:
            continue
        top = leaf.path[0] if len(leaf.path) > 1 else "run"
        if top not in groups:
            groups[top] = parser.add_argument_group((group_titles or {}).get(top, top))
        flags = [leaf.flag.replace("_", "-")]
        if flags[0] != leaf.flag:
            flags.append(leaf.flag)
        annotation = leaf.annotation

        def convert(text: str, annotation: Any = annotation, flag: str = leaf.flag) -> Any:
            try:
                return parse_value(text, annotation)
            except (ValueError, TypeError) as err:
                raise argparse.ArgumentTypeError(f"{flag}: {err}") from None

        text = leaf.help or "(no description)"
        groups[top].add_argument(
            *flags, dest=leaf.dest, type=convert, default=argparse.SUPPRESS,
            metavar=_metavar(annotation),
            help=f"{text} [{_type_name(annotation)}; default: {_shown(leaf.value)}]",
        )


def replace_path(config: Any, path: Sequence[str], value: Any) -> Any:
    """`config` with the field at `path` set to `value` (frozen dataclasses rebuilt, so their
    `__post_init__` checks run again).

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class A:
    ...     x: int = 1
    >>> replace_path(A(), ["x"], 3)
    A(x=3)
    """
    head, *rest = path
    if not any(f.name == head for f in dataclasses.fields(config)):
        raise ConfigError(f"{type(config).__name__} has no field {head!r}")
    new = replace_path(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: new})


def parse_config(parser: argparse.ArgumentParser, config: Any,
                 argv: Sequence[str] | None = None, *,
                 exclude: Collection[tuple[str, ...]] = ()) -> Any:
    """Parse `argv` with `parser` (built by `add_config_arguments` on `config`) and return
    `config` with every given flag applied (fields in `exclude` are never read).

    Raises:
      ConfigError: an override the config's own validation rejects (its message names the field).
    """
    namespace = parser.parse_args(argv)
    for leaf in leaves(config):
        if leaf.path not in exclude and hasattr(namespace, leaf.dest):
            config = replace_path(config, leaf.path, getattr(namespace, leaf.dest))
    return config


def parse_preset_cli(prog: str, doc: str, presets: Sequence[str],
                     defaults_of: Callable[[str], C], argv: Sequence[str] | None = None, *,
                     exclude: Collection[tuple[str, ...]] = (("preset",),)) -> C:
    """An experiment's config from its command line: `--preset NAME` (default `cpu`) picks the
    defaults, then `--FIELD VALUE` overrides them; `--help` lists every field with its default.

    Args:
      prog: the command, as the user types it (`python -m experiments.slim_finetune`).
      doc: the command module's docstring; its first line, after `prog: `, describes it.
      presets: the preset names, for `--help`.
      defaults_of: the config of a preset name (a frozen dataclass with a `preset` field).
      argv: the arguments (default `sys.argv[1:]`).
      exclude: fields that are not flags (`preset` is read first, on its own).

    Raises:
      ConfigError: an unknown preset (from `defaults_of`), or an override the config's own
        validation rejects.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = OneLineParser(prog=prog, add_help=False)
    first.add_argument("--preset", default="cpu")
    name = first.parse_known_args(argv)[0].preset
    defaults = dataclasses.replace(defaults_of(name), preset=name)
    parser = OneLineParser(
        prog=prog, usage=f"{prog} [--preset NAME] [--FIELD VALUE ...]",
        description=doc.split("\n\n")[0].split(": ", 1)[1],
        epilog=f"Presets: {', '.join(presets)}. Tuples are comma-separated, 'none' is None; "
               f"--data-dir overrides ${DATA_DIR_ENV}.")
    parser.add_argument("--preset", default="cpu", metavar="{" + ",".join(presets) + "}",
                        help="the preset whose values are the defaults below [default: cpu]")
    add_config_arguments(parser, defaults, exclude=exclude)
    return parse_config(parser, defaults, argv, exclude=exclude)
