"""The CLI starts without torch, and bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "edgevlm.cli"]


def test_cli_imports_no_torch():
    code = ("import sys, edgevlm.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_lists_every_stage():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "init", "train", "eval", "distill", "quantize", "export", "run",
                    "bench", "demo"):
        assert command in out


def test_bad_input_is_one_line(tmp_path):
    r = subprocess.run([*CLI, "eval", str(tmp_path / "nope"), str(tmp_path / "d.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


def test_readme_has_the_two_setup_commands_ci_runs():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text().split("## Set up", 1)[1]
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].startswith("pip install torch==2.13.0")
    assert "pytest" in block[1]
    assert "README.md" in (root / ".ci" / "run").read_text()
