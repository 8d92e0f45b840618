"""No function in src/ runs over 80 lines, and the two stage verbs (`quantize`, `export`) stay
under 60: complexity is split where a reader would look for it (issue 32)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80
VERB_LINES = {"edgevlm.quant.api.quantize": 60, "edgevlm.export.exporter.export": 60}


def long_functions(path: Path, module: str) -> list[str]:
    """Functions (docstring included) over their limit."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            limit = VERB_LINES.get(f"{module}.{node.name}", MAX_LINES)
            if lines > limit:
                bad.append(f"{path.name}:{node.lineno} {node.name} has {lines} lines (> {limit})")
    return bad


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted((SRC / "edgevlm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def test_functions_stay_short():
    bad = [b for name, path in _modules() for b in long_functions(path, name)]
    assert not bad, bad


def test_the_length_check_sees_a_long_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n" + "    x = 1\n" * 80)
    assert long_functions(f, "m") == ["m.py:1 f has 81 lines (> 80)"]
