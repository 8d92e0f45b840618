"""One writer per OUT (issue 33): while one command writes OUT, a second one writing the same OUT
is refused in one line naming the first, instead of both succeeding and one result being lost;
the lock leaves nothing beside OUT and goes when its process does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgevlm.atomic import atomic_dir, check_new, unlock
from edgevlm.errors import UserError
from tests.reliability.test_outputs import RTN, run
from tests.tools import without_notes

HOLD = """
import sys, time
from edgevlm.atomic import check_new
check_new(sys.argv[1], True)
print("held", flush=True)
time.sleep(120)
"""


def hold(out):
    """A process that has started writing `out` (it holds the lock and sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_until_the_first_is_gone(tmp_path):
    out = tmp_path / "out"
    first = hold(out)
    try:
        with pytest.raises(UserError, match=rf"{out} is being written by another edgevlm "
                                            rf"command \(process {first.pid}\)"):
            check_new(out, overwrite=False)
    finally:
        first.kill()
        first.wait()
    check_new(out, overwrite=False)  # the lock went with its process
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside OUT


def test_the_lock_is_let_go_once_out_is_written(tmp_path):
    """In one process, a finished atomic_dir releases OUT: another process may write it next."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    second = hold(out)  # would block forever if the lock were still held here
    second.kill()
    second.wait()
    unlock(out)


@pytest.mark.slow
def test_a_second_quantize_into_the_same_out_is_one_line(micro_model_dir, tmp_path):
    out = tmp_path / "q"
    first = hold(out)
    try:
        code, text = run("quantize", micro_model_dir, "--out", out, *RTN)
    finally:
        first.kill()
        first.wait()
    assert code == 2, text
    assert without_notes(text) == (f"error: {out} is being written by another edgevlm command "
                                   f"(process {first.pid}); wait for it to finish, or choose "
                                   "another output")
    assert not out.exists()
