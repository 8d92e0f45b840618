"""--overwrite never deletes or alters anything but an edgevlm artifact at OUT, no command writes
into its own input, and temporary folders that killed runs left behind are swept (issue 20,
items 1 and 6). Each case asserts the exit code, the one line, and that the input folder's
bytes did not change."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import without_notes

CLI = [sys.executable, "-m", "edgevlm.cli"]
RTN = ["--method", "rtn", "--group-size", "32"]  # data-free, seconds on the micro model


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run(*args, cwd=None):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"})
    return r.returncode, (r.stdout + r.stderr).strip()


@pytest.fixture
def model(micro_model_dir, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(micro_model_dir, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "quantize"])
@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_out_related_to_the_input_is_refused(command, where, model, tmp_path):
    out = {"same": model, "inside": model / "sub", "above": tmp_path}[where]
    before = digest(model)
    extra = RTN if command == "quantize" else ["--no-validate"]
    code, text = run(command, model, "--out", out, "--overwrite", *extra)
    assert code == 2, text
    assert without_notes(text).startswith("error:")
    assert "is, contains or lies inside the input" in text
    assert len(without_notes(text).splitlines()) == 1, text
    assert digest(model) == before
    assert not (model / "sub").exists()


@pytest.mark.slow
def test_overwrite_refuses_a_folder_of_user_files(model, tmp_path):
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    code, text = run("quantize", model, "--out", user, "--overwrite", *RTN)
    assert code == 2 and "holds files edgevlm did not write" in text, text
    assert (user / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    code, text = run("export", model, "--out", a_file, "--overwrite", "--no-validate")
    assert code == 2 and "is not a folder edgevlm wrote" in text, text
    assert a_file.read_text() == "x"


def test_overwrite_refuses_the_working_directory(model, tmp_path):
    work = tmp_path / "here"
    work.mkdir()
    (work / "config.json").write_text("{}")  # even one that looks like an artifact
    code, text = run("quantize", model, "--out", ".", "--overwrite", *RTN, cwd=work)
    assert code == 2 and "which --overwrite would delete" in text, text
    assert (work / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_overwrite_replaces_an_artifact_and_sweeps_dead_runs_leftovers(model, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", model, "--out", out, *RTN)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".q.{dead}.abc123.tmp"  # what a killed quantize leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".q.{os.getpid()}.def456.tmp"  # a run still going: kept
    live.mkdir()
    code, text = run("quantize", model, "--out", out, *RTN, "--bits", "8", "--overwrite")
    assert code == 0, text
    assert '"num_bits": 8' in (out / "config.json").read_text()
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")) == [live.name]


@pytest.mark.slow
def test_bad_seeds_are_one_line(model, shapes_dir, tmp_path):
    for args in (["train", model, shapes_dir / "train.json", "--out", tmp_path / "t", "--steps",
                  "1"], ["quantize", model, "--out", tmp_path / "q", *RTN],
                 ["init", tmp_path / "i", "--preset", "tiny-teacher", "--tokenizer-from",
                  model]):
        code, text = run(*args, "--seed", "-1")
        assert code == 2 and text == ("error: --seed -1 is not a valid seed; give an integer "
                                      "from 0 to 4294967295"), text
    assert not any((tmp_path / n).exists() for n in ("t", "q", "i"))


def test_runtime_bad_inputs_are_user_errors(export_dir_for_reliability):
    import numpy as np

    from edgevlm.errors import UserError
    from edgevlm.runtime import VLM

    vlm = VLM.load(export_dir_for_reliability, provider="cpu")
    with pytest.raises(UserError, match="not valid Unicode .* lone surrogate"):
        vlm.generate(None, "caf\udce9")
    with pytest.raises(UserError, match="image array is 0x0 pixels"):
        vlm.generate(np.zeros((0, 0, 3), np.uint8), "What is it?")
    with pytest.raises(UserError, match="seed= -1 is not a valid seed"):
        vlm.generate(None, "hi", temperature=1.0, seed=-1)
    assert vlm.generate(np.zeros((1, 1, 3), np.uint8), "What is it?", max_new_tokens=2).timings


@pytest.fixture(scope="module")
def export_dir_for_reliability(micro_model_dir, tmp_path_factory):
    from edgevlm.export import ExportConfig, export

    out = tmp_path_factory.mktemp("rel") / "export"
    export(micro_model_dir, out, ExportConfig(precision="fp32", validate=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
@pytest.mark.parametrize("command", ["quantize", "export", "eval"])
def test_damaged_weights_are_one_line(model, tmp_path, damage, command, shapes_dir):
    weights = model / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"")
    args = {"quantize": ["quantize", model, "--out", tmp_path / "o", *RTN],
            "export": ["export", model, "--out", tmp_path / "o"],
            "eval": ["eval", model, shapes_dir / "eval.json"]}[command]
    code, text = run(*args)
    assert code == 2 and len(without_notes(text).splitlines()) == 1, text
    assert ("damaged or truncated" if damage != "missing" else "has no weights") in text, text
    assert not (tmp_path / "o").exists()


def test_training_data_and_runtime_see_a_transparent_image_alike(tmp_path):
    """An RGBA image reaches the model the same through edgevlm.data (training, eval) and the
    runtime: transparency composited onto white, not dropped."""
    import numpy as np
    from PIL import Image

    from edgevlm.data import open_image
    from edgevlm.runtime.preprocess import load_image, to_rgb

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    ours = np.asarray(open_image(tmp_path / "a.png"))
    assert (ours == to_rgb(load_image(tmp_path / "a.png"))).all()
    assert (ours[:, :4] == 255).all() and (ours[:, 4:] == [200, 0, 0]).all()


def test_a_decompression_bomb_in_training_data_is_one_error(tmp_path, monkeypatch):
    from PIL import Image

    from edgevlm.data import open_image
    from edgevlm.errors import UserError

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is then a "bomb"
    with pytest.raises(UserError, match="too large to decode safely"):
        open_image(tmp_path / "big.png")
