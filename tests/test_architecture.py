"""Imports run downwards only (README "Architecture", CONTRIBUTING.md "Layers"), checked by walking
every import of slim_jax/ and experiments/ with `ast` (function-level and TYPE_CHECKING imports
included), and no code outside a family's own files asks which family a model is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LEAVES = ("slim_jax.errors", "slim_jax.paths", "slim_jax.settings", "slim_jax.tokenizer",
          "slim_jax.hub")
"""Leaf modules: anyone may import them; they import only each other."""
LAYERS: dict[str, int] = {
    **{name: 0 for name in LEAVES},
    "slim_jax.core": 1,
    "slim_jax.nn": 2,
    **{name: 3 for name in ("slim_jax.models", "slim_jax.data", "slim_jax.parallel",
                            "slim_jax.checkpoint")},
    **{name: 4 for name in ("slim_jax.train", "slim_jax.lorahub", "slim_jax.eval")},
    **{name: 5 for name in ("slim_jax", "slim_jax.generate", "experiments")},
}
"""Rank of each part; a module may import parts of its own rank or lower."""
FORBIDDEN_SIDEWAYS = {("slim_jax.models", "slim_jax.data"), ("slim_jax.data", "slim_jax.models")}
"""Same-rank pairs that must not meet: models know nothing of data, data nothing of models."""
FAMILY_FILES = {"llama.py", "llama_hf.py", "llama2c.py", "t5.py", "t5_hf.py", "t5_blocks.py",
                "t5_config.py", "registry.py"}
FAMILY_CLASSES = {"Llama", "T5"}


def _part(module: str) -> str:
    """The layer part of a dotted module name: `slim_jax.models.llama` -> `slim_jax.models`."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"module {module} belongs to no layer of tests/test_architecture.py")


def _sources() -> list[tuple[str, Path]]:
    files = sorted((ROOT / "slim_jax").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py"))
    return [(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), f)
            for f in files]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from slim_jax import hub` imports slim_jax.hub: name the imported member too.
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in out if name.split(".")[0] in ("slim_jax", "experiments")]


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, path in _sources():
        source = _part(module)
        for line, name in _imports(path):
            target = _part(name)
            if LAYERS[target] > LAYERS[source] or (source, target) in FORBIDDEN_SIDEWAYS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {name}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from slim_jax.models.hf import read_config\n")
    [(line, name)] = _imports(bad)
    assert LAYERS[_part(name)] > LAYERS[_part("slim_jax.tokenizer")] and line == 2


@pytest.mark.parametrize("part", ["slim_jax", "experiments"])
def test_no_isinstance_on_a_model_family_outside_its_files(part):
    """CONTRIBUTING.md: callers use `slim_jax.models.family.ModelFamily`, never the class."""
    wrong = []
    for path in sorted((ROOT / part).rglob("*.py")):
        if path.parent.name == "models" and path.name in FAMILY_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
                    and len(node.args) == 2):
                named = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None)
                         for n in ast.walk(node.args[1])}
                if named & FAMILY_CLASSES:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, "isinstance on a model family: " + ", ".join(wrong)
