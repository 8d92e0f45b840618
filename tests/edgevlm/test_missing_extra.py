"""A runtime-only install (`pip install edgevlm`, no extras) running a toolkit command gets one
line naming the extra, not a traceback. The install is emulated by making every module the
toolkit extra adds (edgevlm.cli.TOOLKIT_MODULES) fail to import, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tools import without_notes

BLOCK = """
import sys
from edgevlm.cli import TOOLKIT_MODULES
class Block:  # the runtime install: none of the toolkit's packages
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in TOOLKIT_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["edgevlm", *sys.argv[1:]]
from edgevlm.cli import main
main()
"""

COMMANDS = {  # every toolkit command, with the arguments its parser requires
    "init": ["init", "O", "--preset", "tiny-teacher"],
    "train": ["train", "M", "d.json", "--out", "O"],
    "eval": ["eval", "M", "d.json"],
    "quantize": ["quantize", "M", "--out", "O"],
    "export": ["export", "M", "--out", "O"],
    "distill": ["distill", "--teacher", "M", "--student", "M", "--data", "d.json", "--out", "O"],
    "demo": ["demo", "--quick", "--out", "O"],
    "bench": ["bench", "M", "--data", "d.json"],  # a model folder runs on the torch reference
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_toolkit_command_without_the_toolkit_names_the_extra(name, tmp_path):
    (tmp_path / "M").mkdir()
    (tmp_path / "M" / "config.json").write_text("{}")
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]))
    r = subprocess.run([sys.executable, "-c", BLOCK, *COMMANDS[name]], capture_output=True,
                       text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1",
                                                     "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, out
    out = without_notes(out)
    assert out.startswith(f"error: `edgevlm {name}` needs the toolkit"), out
    assert "pip install -e '.[toolkit]'" in out and len(out.splitlines()) == 1, out
    assert not (tmp_path / "O").exists()


def test_runtime_commands_work_without_the_toolkit(tmp_path):
    """`edgevlm data pydoc` needs only the standard library."""
    r = subprocess.run([sys.executable, "-c", BLOCK, "data", "pydoc", "t.txt"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "t.txt").stat().st_size > 100_000


def test_an_error_line_keeps_its_brackets(monkeypatch, capsys):
    """UserErrors are printed verbatim: rich would read `[toolkit]` as markup and drop it."""
    from edgevlm import cli
    from edgevlm.errors import UserError

    def boom():
        raise UserError("pip install 'edgevlm[toolkit]' and [bold]this[/bold]")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    out = capsys.readouterr()
    assert "pip install 'edgevlm[toolkit]' and [bold]this[/bold]" in (out.out + out.err)
