"""`python -m benchmarks`: every benchmark script, by stage, with the first line of its help."""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).parent


def scripts() -> list[tuple[str, str]]:
    """(module, first docstring line) of every runnable script (one with a __main__ guard)."""
    out = []
    for path in sorted(HERE.glob("*/*.py")):
        if path.name == "__init__.py":
            continue
        source = path.read_text()
        if path.name != "__main__.py" and 'if __name__ == "__main__":' not in source:
            continue  # a helper module another script imports
        doc = (ast.get_docstring(ast.parse(source)) or "").split("\n")[0]
        module = ".".join(path.relative_to(HERE.parent).with_suffix("").parts)
        out.append((module.removesuffix(".__main__"), doc))
    return out


def main() -> None:
    print("The benchmark scripts by stage; run them from the repository root.")
    stage = None
    for module, doc in scripts():
        if module.split(".")[1] != stage:
            stage = module.split(".")[1]
            print(f"\n{stage}/")
        print(f"  python -m {module}\n      {doc}")
    print("\nEach takes --help. The harness: benchmarks/harness.py; docs/benchmarks.md.")


if __name__ == "__main__":
    main()
