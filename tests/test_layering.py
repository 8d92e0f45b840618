"""The import rules of DESIGN.md that hold today, read from the source (imports inside functions
count): the runtime an app embeds imports no toolkit module but `edgevlm.errors` and no
third-party package but its device install's; the bench builds on the runtime alone (its torch
target aside) and adds only matplotlib; nothing but the CLI imports the CLI. A forbidden import
fails here with the file and line."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# the device install (pyproject.toml dependencies) and the standard library
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "PIL", "jinja2"}
# the torch model as a bench target: imported only for model folders, it may use the toolkit
TORCH_TARGET = "edgevlm.bench.torch_target"
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


def _violations(room: str, first_party: tuple[str, ...], third_party: set[str]) -> list[str]:
    """Imports of the modules of `room` (a package) beyond `first_party` prefixes, the standard
    library and `third_party`."""
    bad = []
    for name, path in _modules().items():
        if not (name == room or name.startswith(room + ".")) or name == TORCH_TARGET:
            continue
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top == "edgevlm":
                ok = mod.startswith(first_party)
            else:
                ok = top in sys.stdlib_module_names or top == "__future__" or top in third_party
            if not ok:
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    return bad


def test_the_runtime_imports_only_its_device_install_and_errors():
    bad = _violations("edgevlm.runtime", ("edgevlm.errors", "edgevlm.runtime"),
                      RUNTIME_THIRD_PARTY)
    assert not bad, bad


def test_the_bench_imports_only_the_runtime():
    """Exports are benched on the device install (plus matplotlib, to draw)."""
    bad = _violations("edgevlm.bench", ("edgevlm.errors", "edgevlm.runtime", "edgevlm.bench"),
                      RUNTIME_THIRD_PARTY | {"matplotlib"})
    assert not bad, bad
    assert not any(mod.startswith("edgevlm.bench") for name, path in _modules().items()
                   if name.startswith("edgevlm.runtime") for _, mod in _imports(path))


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
