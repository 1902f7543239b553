"""Experiment command lines from their config dataclasses, by tyro, with named presets.

A config is a tree of frozen dataclasses; every leaf field is one flag `--path.to.field` (dashes for
underscores: `--train.optimizer.learning-rate`), its help the field's entry in its class's
`Attributes:` docstring block (first sentence), its default the preset's value. Presets are named
config instances (`experiments/presets/*.py`): `--preset NAME` picks the defaults, later flags
override them, and a field added to a config class is a flag at once. Values as before:
`--seeds 0,1,2` (tuples comma-separated), `none` for None, `true`/`false`/`yes`/`no` for booleans;
anything else tyro parses from the annotation (Literal choices, numbers). Errors print one line,
`python -m experiments.X: error: ...`, and exit 2; a value a config class rejects is named by its
flag (the class raises `ConfigError(..., field=name)`, and the section's place in the config tree
gives the prefix: `--slim.top-k must be between 1 and ...`).

Why tyro: of the maintained typed-config CLI libraries it builds the parser from dataclasses and
their docstrings as they are (no decorators or base classes in the library's own configs), takes an
instance as the defaults (our presets), and is extensible by rules for the few types we spell our
own way. simple-parsing needs its `Serializable`/`field` helpers for the same, and fiddle builds
configs as `fdl.Config` graphs of call sites rather than frozen dataclasses (its flags integration
is absl-based), so both would mean rewriting the library's configs.

>>> import dataclasses
>>> from experiments.presets.slim import PRESETS
>>> config = parse_config("demo", "demo: a demo.", PRESETS, ["--seeds", "1,2",
...                       "--train.optimizer.learning-rate", "0.5", "--overwrite", "yes"])
>>> config.seeds, config.train.optimizer.learning_rate, config.overwrite, config.preset
((1, 2), 0.5, True, 'cpu')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import operator
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import tyro
from tyro.constructors import (
    ConstructorRegistry,
    PrimitiveConstructorSpec,
    PrimitiveTypeInfo,
    StructConstructorSpec,
    StructTypeInfo,
)
from tyro.constructors._struct_spec_dataclass import dataclass_rule

from slim_jax.errors import ConfigError, SlimJaxError, with_flags
from slim_jax.settings import DATA_DIR_ENV
from slim_jax.train.workers import StopSignals, WorkerDied

C = TypeVar("C")
TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off")
NONE = "none"
REGISTRY = ConstructorRegistry()
# Fields the program sets itself, by class and field name: no flag.
_HIDDEN: dict[str, set[str]] = {"TrainConfig": {"run_dir"}}


def _parse_item(text: str, item: Any) -> Any:
    text = text.strip()
    if typing.get_origin(item) is Literal:
        options = typing.get_args(item)
        for option in options:
            if str(option) == text:
                return option
        raise ValueError(f"expected one of {', '.join(map(str, options))}, got {text!r}")
    return item(text)


@REGISTRY.primitive_rule
def _tuple_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """`tuple[T, ...]` of simple items as one comma-separated value; other tuples as JSON."""
    if info.type_origin is not tuple:
        return None
    args = typing.get_args(info.type)
    item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
    if item in (int, float, str) or typing.get_origin(item) is Literal:
        return PrimitiveConstructorSpec(
            nargs=1, metavar="A,B,...",
            instance_from_str=lambda a: tuple(_parse_item(p, item) for p in a[0].split(",")
                                              if p.strip()),
            is_instance=lambda x: isinstance(x, tuple),
            str_from_instance=lambda x: [",".join(map(str, x))])
    return PrimitiveConstructorSpec(
        nargs=1, metavar="JSON", instance_from_str=lambda a: _tuples(json.loads(a[0])),
        is_instance=lambda x: isinstance(x, tuple),
        str_from_instance=lambda x: [json.dumps(x)])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """`bool` takes a value (`--progress false`), one spelling per flag."""
    if info.type is not bool:
        return None

    def parse(args: list[str]) -> bool:
        word = args[0].strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(f"expected true or false, got {args[0]!r}")
        return word in TRUE

    return PrimitiveConstructorSpec(nargs=1, metavar="{true,false}", instance_from_str=parse,
                                    is_instance=lambda x: isinstance(x, bool),
                                    str_from_instance=lambda x: [str(x).lower()])


@REGISTRY.primitive_rule
def _none_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """None is written `none`."""
    if info.type is not type(None):
        return None
    return PrimitiveConstructorSpec(nargs=1, metavar=NONE, instance_from_str=lambda a: None,
                                    is_instance=lambda x: x is None,
                                    str_from_instance=lambda x: [NONE], choices=(NONE, "None"))


@REGISTRY.primitive_rule
def _any_rule(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """`Any` and path-like fields (dtypes, folders) are read as text."""
    if info.type is not Any and info.type_origin is not os.PathLike:
        return None
    return PrimitiveConstructorSpec(nargs=1, metavar="STR", instance_from_str=lambda a: a[0],
                                    is_instance=lambda x: True,
                                    str_from_instance=lambda x: [str(x)])


def field_docs(cls: type) -> dict[str, str]:
    """Help per field from the `Attributes:` block of a class docstring (`name: text`, or
    `a, b: text` for several fields, continued on more deeply indented lines).

    >>> class C:
    ...     '''Attributes:
    ...       rate: step size,
    ...         per update.
    ...       b1, b2: Adam decays.'''
    >>> field_docs(C)
    {'rate': 'step size, per update.', 'b1': 'Adam decays.', 'b2': 'Adam decays.'}
    """
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    docs: dict[str, str] = {}
    if start is None:
        return docs
    names: list[str] = []
    indent = None
    entry = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = entry.match(line)
        if match and (indent is None or depth == indent):
            indent = depth
            names = [n.strip() for n in match.group(2).split(",") if n.strip()]
            docs.update(dict.fromkeys(names, match.group(3).strip()))
        elif indent is not None and depth > indent:
            for name in names:
                docs[name] = (docs[name] + " " + line.strip()).strip()
        elif indent is not None and depth < indent:
            break
    return docs


def first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses.

    >>> first_sentence("devices (0: all). More.")
    'devices (0: all).'
    """
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i + 1]
    return text


def flag(path: str) -> str:
    """The command-line flag of a config field path: `data.batch_size` -> `--data.batch-size`.

    >>> flag("train.optimizer.learning_rate")
    '--train.optimizer.learning-rate'
    """
    return "--" + path.replace("_", "-")


class _Rejected(Exception):
    """A config class rejected one of its fields (a `ConfigError` with `field`) while tyro built
    it. Not a ValueError, so that tyro, which would keep only the message, lets it through to
    `parse_config`, which finds the section by its default instance and names the flag."""

    def __init__(self, section_type: type, section_default: Any, error: ConfigError) -> None:
        super().__init__(str(error))
        self.section_type, self.section_default, self.error = (section_type, section_default,
                                                               error)


@REGISTRY.struct_rule
def _dataclass_rule(info: StructTypeInfo) -> StructConstructorSpec | None:
    """Dataclasses as tyro reads them, with one sentence of help per field, the fields the
    program sets itself hidden, and their validation errors carried out as `_Rejected`."""
    spec = dataclass_rule(info)
    if spec is None:
        return None
    hidden = _HIDDEN.get(getattr(info.type, "__name__", ""), set())
    docs = field_docs(info.type)
    fields = []
    for f in spec.fields:
        kind = typing.Annotated[f.type, tyro.conf.Suppress] if f.name in hidden else f.type
        fields.append(dataclasses.replace(f, type=kind, helptext=docs.get(f.name, "")))
    instantiate, section_type, section_default = spec.instantiate, info.type, info.default

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return instantiate(*args, **kwargs)
        except ConfigError as err:
            if err.field is None:
                raise
            raise _Rejected(section_type, section_default, err) from err

    return dataclasses.replace(spec, fields=tuple(fields), instantiate=checked)


def _section_paths(config: Any, prefix: str = "") -> dict[int, str]:
    """`id(section) -> "path."` for every dataclass section of `config` ("" for the root)."""
    paths = {id(config): prefix}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            paths.update({k: v for k, v in _section_paths(value, f"{prefix}{f.name}.").items()
                          if k not in paths})
    return paths


def rejected_message(rejected: _Rejected, defaults: Any) -> str:
    """The one-line message of a field a config class rejected, naming its flag."""
    paths = _section_paths(defaults)
    prefix = paths.get(id(rejected.section_default))
    if prefix is None and rejected.section_type is type(defaults):
        prefix = ""
    if prefix is None:  # a section without a preset default: the library's own words
        return str(rejected.error)
    return rejected.error.named(lambda name: flag(prefix + name))


def _one_line(text: str) -> str:
    """The message of tyro's boxed error, on one line (UTF-8 box or, when stdout is not UTF-8,
    its ASCII form: a title row, a rule of dashes, the message, a rule, the help footer)."""
    rows = [row for row in (line.strip().strip("│").strip() for line in text.splitlines()) if row]

    def rule(row: str) -> bool:
        return set(row) <= set("─-")

    if rows and rows[0].startswith("╭"):
        rows = rows[1:]
    elif len(rows) > 1 and rule(rows[1]):
        rows = rows[2:]
    lines = []
    for row in rows:
        if rule(row) or row.startswith("╰"):
            break
        lines.append(row)
    message = " ".join(lines).strip()
    message = re.sub(r"^Error parsing [\w.-]+: (--)", r"\1", message)  # the flag is named
    return re.sub(r"^Error parsing ([\w.-]+): ", r"\1: ", message) or "invalid arguments"


def _preset_name(argv: Sequence[str], default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return default


def parse_config(prog: str, doc: str, presets: Mapping[str, C],
                 argv: Sequence[str] | None = None, *, default_preset: str = "cpu") -> C:
    """An experiment's config from its command line: `--preset NAME` (default `cpu`) picks the
    defaults among `presets`, then every other flag overrides a field; `--help` lists every field
    with its default. Bad values print one line and exit 2 (`SystemExit`).

    Raises:
      ConfigError: an unknown preset (listing the presets).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _preset_name(argv, default_preset)
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
    defaults = dataclasses.replace(presets[name], preset=name)  # type: ignore[type-var]
    description = (doc.split("\n\n")[0].split(": ", 1)[-1] + f" Presets: {', '.join(presets)}; "
                   f"tuples are comma-separated, 'none' is None; --data-dir overrides "
                   f"${DATA_DIR_ENV}.")
    if "-h" in argv or "--help" in argv:
        print(help_text(prog, description, defaults), end="")
        raise SystemExit(0)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(type(defaults), default=defaults, args=argv, prog=prog,
                            description=description, registry=REGISTRY,
                            config=(tyro.conf.FlagConversionOff,))
    except _Rejected as rejected:
        print(f"{prog}: error: {rejected_message(rejected, defaults)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        if stop.code not in (0, None):
            print(f"{prog}: error: {_one_line(captured.getvalue())}", file=sys.stderr)
        else:
            sys.stderr.write(captured.getvalue())
        raise


def run_command(prog: str, argv: Sequence[str] | None, parse: Callable[[list[str]], C],
                run: Callable[[C, list[str], StopSignals], int],
                flags: Mapping[str, str] | None = None) -> int:
    """An experiment command's `main`: parse `argv` (default `sys.argv[1:]`), then
    `run(config, argv, stop)` under `StopSignals`. Returns `run`'s exit status; 0 after
    `--help`; 2 on bad input, after one line `prog: error: ...` on stderr (no traceback; library
    argument names in it replaced by the command's `flags`, e.g. `allow_pickle=True` ->
    `--modules.allow-pickle`); 1 after one such line when a worker process died."""
    args = list(sys.argv[1:] if argv is None else argv)
    with StopSignals() as stop:
        try:
            try:
                config = parse(args)
            except SystemExit as done:  # --help, or a flag tyro could not read (one line said so)
                return int(done.code or 0)
            return run(config, args, stop)
        except SlimJaxError as err:
            print(f"{prog}: error: {with_flags(' '.join(str(err).split()), flags or {})}",
                  file=sys.stderr)
            return 2
        except WorkerDied as err:
            print(f"{prog}: error: {err}; the same command resumes", file=sys.stderr)
            return 1


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = _metavar(functools.reduce(operator.or_, args))
        return inner if len(args) == len(typing.get_args(annotation)) else f"{inner}|none"
    if annotation is bool:
        return "{true,false}"
    if annotation in (int, float, str):
        return annotation.__name__.upper()
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[:1]
        simple = item and (item[0] in (int, float, str) or typing.get_origin(item[0]) is Literal)
        return "A,B,..." if simple else "JSON"
    return "STR"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple) and all(isinstance(v, int | float | str) for v in value):
        return ",".join(map(str, value))
    return NONE if value is None else json.dumps(value) if isinstance(value, tuple) else str(value)


def help_text(prog: str, description: str, config: Any) -> str:
    """`--help`: every field once, on one line each: flag, value form, its first sentence of
    help, the preset's value; grouped by the top-level field, each group with its own help."""
    lines = [f"usage: {prog} [--preset NAME] [--FIELD VALUE ...]", "", description, ""]

    def walk(node: Any, prefix: str, title: str) -> None:
        hints = typing.get_type_hints(type(node))
        docs = field_docs(type(node))
        hidden = _HIDDEN.get(type(node).__name__, set())
        nested = []
        lines.append(title)
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.name in hidden:
                continue
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                nested.append((value, f"{prefix}{f.name}.",
                               f"{prefix}{f.name}: {first_sentence(docs.get(f.name, ''))}"))
                continue
            flag = "--" + (prefix + f.name).replace("_", "-")
            lines.append(f"  {flag} {_metavar(hints[f.name])}  "
                         f"{first_sentence(docs.get(f.name, ''))} [default: {_shown(value)}]")
        for value, sub, sub_title in nested:
            walk(value, sub, sub_title)

    walk(config, "", "run:")
    return "\n".join(lines) + "\n"
