"""No function is too long to read: at most 60 lines in serve_app/ and deployments/, 100 in pipeline/.

Lines are counted from the ``def`` to the function's last line (decorators, docstring and
nested functions included), read with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"serve_app": 60, "deployments": 60, "pipeline": 100}
#: Functions allowed over the limit, by "path name" (none today; a new entry needs a reason beside it).
KNOWN_LONG: set[str] = set()


def long_functions(package: str, limit: int) -> list[str]:
    out = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit and f"{path.relative_to(REPO)} {node.name}" not in KNOWN_LONG:
                    out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_the_counter_sees_a_long_function(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n" + "    x = 1\n" * 5 + "\n\ndef g():\n    pass\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert long_functions("pkg", 5) == ["pkg/m.py:1 f (6 lines)"]


@pytest.mark.parametrize("package", sorted(LIMITS))
def test_no_function_is_too_long(package):
    assert long_functions(package, LIMITS[package]) == []
