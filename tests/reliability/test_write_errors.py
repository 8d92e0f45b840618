"""Writing an output can meet a full disk, a read-only file system or a file where a folder
should be (issue 33): each ends in one line naming the path, and an existing output is left as
it was, never a traceback."""

from __future__ import annotations

import errno
import sys

import pytest

from edgevlm import cli
from tests.reliability.test_outputs import run
from tests.tools import without_notes


def init_args(out, shapes_dir):
    return ["init", str(out), "--preset", "tiny-student", "--tokenizer-data",
            str(shapes_dir / "train.json")]


@pytest.mark.parametrize(("code", "words", "fix"), [
    (errno.ENOSPC, "No space left on device", "free space or choose another --out"),
    (errno.EROFS, "Read-only file system", "choose an --out you can write")])
def test_a_full_or_read_only_disk_is_one_line(code, words, fix, shapes_dir, tmp_path, monkeypatch,
                                              capsys):
    import edgevlm.models.new as create_module

    def full(loaded, out_dir, state_dict=None):
        raise OSError(code, words, str(out_dir / "model.safetensors"))

    monkeypatch.setattr(create_module, "save_model", full)
    monkeypatch.setattr(sys, "argv", ["edgevlm", *init_args(tmp_path / "m", shapes_dir)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    text = without_notes((captured.out + captured.err).strip())
    assert text.startswith("error: cannot write ") and f"model.safetensors: {words}; {fix} " \
        "(an existing output was left as it was)" in text, text
    assert len(text.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written folder either


@pytest.mark.slow
def test_out_under_a_file_is_one_line(shapes_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    code, text = run(*init_args(tmp_path / "file" / "m", shapes_dir))
    assert code == 2, text
    line = without_notes(text)
    assert line.startswith("error: cannot write "), text
    assert "File exists; a file stands where a folder is needed" in line, text
    assert len(line.splitlines()) == 1
    assert (tmp_path / "file").read_text() == "mine"
