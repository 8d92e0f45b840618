"""A runtime-only install (`pip install edgevlm`, no extras) running a toolkit command gets one
line naming the extra, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = """
import sys
class Block:  # the runtime install: no torch, no transformers
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["edgevlm", *sys.argv[1:]]
from edgevlm.cli import main
main()
"""


@pytest.mark.parametrize("args", [["demo", "--quick"], ["quantize", "M", "--out", "O"],
                                  ["export", "M", "--out", "O"]])
def test_toolkit_command_without_the_toolkit_names_the_extra(args, tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True,
                       cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                          "COLUMNS": "200"})
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert f"`edgevlm {args[0]}` needs the toolkit" in out
    assert "pip install 'edgevlm[toolkit]'" in out
    assert "Traceback" not in out
    assert not (tmp_path / "O").exists()
