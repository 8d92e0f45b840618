"""Export and quantize killed (SIGKILL) at several points of writing (issue 20): OUT is then
either absent or whole, and the rerun succeeds and leaves no temporary folder behind.

The points are read off the run's own temporary folder `.OUT.<pid>.<random>.tmp`: as soon as it
appears, once it holds a first file, and once it holds half the files a whole OUT has."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability.test_outputs import CLI, RTN, run

POINTS = ["folder made", "first file", "half the files"]


def temp_dirs(parent: Path, out: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")
            and p.name.endswith(".tmp")]


def kill_at(args: list, out: Path, files_needed: int | None, timeout: float = 120) -> str:
    """Start the command and SIGKILL it when its temp folder holds `files_needed` files (None:
    when the folder appears). Returns what happened: "killed" or "finished first"."""
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                return "finished first"
            tmp = temp_dirs(out.parent, out)
            if tmp:
                try:
                    count = sum(1 for p in tmp[0].rglob("*") if p.is_file())
                except FileNotFoundError:  # renamed into OUT while we counted: look again
                    continue
                if files_needed is None or count >= files_needed:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return "killed"
            time.sleep(0.002)
        raise AssertionError(f"{args[0]} neither finished nor reached the kill point")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def whole(command: str, out: Path) -> bool:
    """OUT holds a usable artifact: the export loads in the runtime, the checkpoint in torch."""
    if command == "export":
        from edgevlm.runtime import VLM

        VLM.load(out, provider="cpu")
    else:
        from edgevlm.models import load_model

        load_model(out)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "quantize"])
def test_a_killed_run_leaves_out_absent_or_whole(command, micro_model_dir, tmp_path):
    extra = ["--no-validate", "--precision", "fp32"] if command == "export" else RTN
    reference = tmp_path / "reference"
    code, text = run(command, micro_model_dir, "--out", reference, *extra)
    assert code == 0, text
    n_files = sum(1 for p in reference.rglob("*") if p.is_file())
    assert n_files >= 4, n_files
    outcomes = {}
    for point in POINTS:
        out = tmp_path / point.replace(" ", "-")
        needed = {"folder made": None, "first file": 1, "half the files": n_files // 2}[point]
        outcomes[point] = kill_at([command, micro_model_dir, "--out", out, *extra], out, needed)
        left = temp_dirs(tmp_path, out)
        if outcomes[point] == "killed":  # a kill that lands just after the rename leaves OUT
            assert left or out.exists(), f"{point}: a killed run left neither its temp folder " \
                "(for the sweep) nor a whole OUT"
        assert not out.exists() or whole(command, out), point
        code, text = run(command, micro_model_dir, "--out", out, *extra,
                         *(["--overwrite"] if out.exists() else []))
        assert code == 0, f"{point}: rerun failed: {text}"
        assert whole(command, out)
        assert temp_dirs(tmp_path, out) == [], f"{point}: the rerun left a temp folder"
    assert list(outcomes.values()).count("killed") >= 2, outcomes
