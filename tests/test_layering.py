"""The import rules of DESIGN.md that hold today, read from the source (imports inside functions
count): the runtime an app embeds imports no toolkit module but `edgevlm.errors` and no
third-party package but its device install's; nothing but the CLI imports the CLI. A forbidden
import fails here with the file and line."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# the device install (pyproject.toml dependencies) and the standard library
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "PIL", "jinja2"}
# bench reports and plans draw their plots in the runtime package until they move to
# edgevlm.bench (issue 32); matplotlib is imported inside the drawing functions only
PLOTS = {"edgevlm.runtime.bench_report", "edgevlm.runtime.plan"}
CLI = "edgevlm.cli"  # the package: the Typer app, its command modules and the demo


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "edgevlm").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_the_runtime_imports_only_its_device_install_and_errors():
    bad = []
    for name, path in _modules().items():
        if not name.startswith("edgevlm.runtime"):
            continue
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top == "edgevlm":
                ok = mod == "edgevlm.errors" or mod.startswith("edgevlm.runtime")
            elif top in sys.stdlib_module_names or top == "__future__":
                ok = True
            else:
                ok = top in RUNTIME_THIRD_PARTY or (top == "matplotlib" and name in PLOTS)
            if not ok:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, bad


def test_nothing_outside_the_cli_imports_it():
    def in_cli(module: str) -> bool:
        return module == CLI or module.startswith(CLI + ".")

    bad = [f"{path.relative_to(SRC)}:{line} imports {mod}"
           for name, path in _modules().items() if not in_cli(name)
           for line, mod in _imports(path) if in_cli(mod)]
    assert not bad, bad


def test_the_checks_see_a_forbidden_import(tmp_path):
    """The walk finds imports inside functions, where the toolkit's lazy imports live."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import torch\n    from edgevlm.cli import app\n")
    assert _imports(f) == [(2, "torch"), (3, "edgevlm.cli")]
