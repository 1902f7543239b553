"""The README's runnable example runs as written (so the documentation cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", re.DOTALL)


def readme_examples() -> list[str]:
    return MARKER.findall(README.read_text(encoding="utf-8"))


def test_readme_has_examples():
    assert readme_examples(), "README.md lost its <!-- readme-example --> blocks"


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index, capsys):
    code = readme_examples()[index]
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.splitlines()
    assert out, "the example printed nothing"
