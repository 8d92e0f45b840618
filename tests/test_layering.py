"""The layout rules of DESIGN.md, read from the source (imports inside functions count): the
runtime an app embeds imports no toolkit module but `edgevlm.errors` and no third-party package
but its device install's; the bench builds on the runtime and the torch-free data readers (its
torch target aside) and adds only matplotlib; the server builds on the runtime and adds only
starlette and uvicorn; families never import models; nothing but the CLI
imports the CLI; no two modules import each other, however indirectly; no family or model_type
name is compared outside the family files and the runtime's manifest reader. A break fails
here with the file and line."""

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


def test_the_bench_imports_only_the_runtime_and_data():
    """Exports are benched on the device install (plus matplotlib, to draw); eval sets are read
    by edgevlm.data's torch-free readers."""
    bad = _violations("edgevlm.bench", ("edgevlm.errors", "edgevlm.runtime", "edgevlm.bench",
                                        "edgevlm.data.samples", "edgevlm.data.metrics"),
                      RUNTIME_THIRD_PARTY | {"matplotlib"})
    assert not bad, bad
    assert not any(mod.startswith("edgevlm.bench") for name, path in _modules().items()
                   if name.startswith("edgevlm.runtime") for _, mod in _imports(path))


def test_the_server_imports_only_the_runtime_and_its_asgi_stack():
    """`edgevlm serve` runs on the device install plus the serve extra (starlette, uvicorn):
    never torch, transformers or the toolkit, and nothing but the CLI imports it."""
    bad = _violations("edgevlm.serve", ("edgevlm.errors", "edgevlm.runtime", "edgevlm.serve"),
                      RUNTIME_THIRD_PARTY | {"starlette", "uvicorn"})
    assert not bad, bad
    assert not any(mod.startswith("edgevlm.serve") for name, path in _modules().items()
                   if not name.startswith(("edgevlm.serve", CLI))
                   for _, mod in _imports(path))


def test_families_import_only_their_base():
    """A family file says what differs; it never reaches up into models, data or the stages."""
    bad = _violations("edgevlm.families", ("edgevlm.errors", "edgevlm.families"),
                      {"torch", "transformers"})
    assert not bad, bad


def test_data_builds_on_families_and_the_runtime_only():
    bad = _violations("edgevlm.data", ("edgevlm.errors", "edgevlm.progress", "edgevlm.data",
                                       "edgevlm.families", "edgevlm.runtime"),
                      {"torch", "PIL", "jinja2"})
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


def _graph() -> dict[str, set[str]]:
    """Module -> the edgevlm modules it imports (`from package import name` counts the submodule
    `name` when there is one, else the package)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in map(resolve, targets) if t and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert circles(_graph()) == []


def test_the_circle_check_sees_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Family names and the model_types of the families, towers and decoders they are built from
FAMILY_NAMES = {"llava", "idefics3", "smolvlm", "siglip_vision_model", "clip_vision_model",
                "llama", "qwen2", "qwen2_moe"}
FAMILY_SEAM = ("edgevlm/families/", "edgevlm/runtime/manifest.py")


def family_comparisons(path: Path) -> list[str]:
    """`x == "llava"`, `x in ("llama", "qwen2")` and the like: a comparison with a family name."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            bad += [f"{path.name}:{node.lineno} compares with {v.value!r}" for v in values
                    if isinstance(v, ast.Constant) and v.value in FAMILY_NAMES]
    return bad


def test_family_names_are_compared_only_by_the_families():
    """Outside the family files (and the runtime's manifest reader, which cannot import them),
    code asks the family: a field or a function, never its name."""
    bad = [b for path in (SRC / "edgevlm").rglob("*.py")
           if not path.relative_to(SRC).as_posix().startswith(FAMILY_SEAM)
           for b in family_comparisons(path)]
    assert not bad, bad


def test_the_family_check_sees_a_comparison(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('def f(c):\n    return c.model_type == "llava" or c.t in ("x", "qwen2")\n')
    assert family_comparisons(f) == ["m.py:2 compares with 'llava'",
                                     "m.py:2 compares with 'qwen2'"]

