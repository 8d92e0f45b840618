"""`edgevlm export`: the Typer command over export()."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.errors import UserError
from edgevlm.runtime import contract


def test_export_command_json(teacher_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(out),
                                      "--precision", "int8", "--vision-precision", "fp32",
                                      "--no-validate", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows["vision_encoder"].startswith("onnx/vision_encoder.onnx (fp32,")
    assert rows["decoder_model_merged"].startswith("onnx/decoder_model_merged_int8.onnx (int8,")
    assert "parity" not in rows
    assert "next:" not in result.output  # --json: the JSON alone
    manifest = json.loads((out / contract.MANIFEST).read_text())
    assert manifest["parity"] is None
    assert manifest["components"]["embed_tokens"]["precision"] == "int8"


def test_export_command_bad_input(teacher_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(tmp_path),
                                      "--quiet"])
    assert isinstance(result.exception, UserError) and "already exists" in str(result.exception)
    result = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(tmp_path / "o"),
                                      "--block-size", "24"])
    assert isinstance(result.exception, UserError) and "power of two" in str(result.exception)


@pytest.mark.slow
def test_export_command_decoder_choice(teacher_dir, tmp_path):
    """--decoder picks the graph; the summary says which, with the built one's size and the
    parity of a built int4 decoder against torch carrying its integers."""
    built = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(tmp_path / "b"),
                                     "--precision", "int4", "--max-context", "96", "--json"])
    assert built.exit_code == 0, built.output
    rows = json.loads(built.stdout)
    assert rows["decoder"] == "builder (34 nodes, KV buffer 96, accuracy_level 4)"
    assert rows["  decoder vs torch, same integers"].endswith("tokens 32/32")
    assert "  as shipped (accuracy_level 4)" in rows
    traced = CliRunner().invoke(app, ["export", str(teacher_dir), "--out", str(tmp_path / "t"),
                                      "--decoder", "traced", "--no-validate"])
    assert traced.exit_code == 0, traced.output
    assert "traced" in traced.stdout
    # the summary ends with what to run on the export, named by its real path
    assert (f"next: edgevlm run {tmp_path / 't'} --image IMG --prompt 'What is in the image?'\n"
            f"      edgevlm bench {tmp_path / 't'} --data EVAL.json") in traced.stderr
    manifest = json.loads((tmp_path / "t" / contract.MANIFEST).read_text())
    assert manifest["decoder"]["kind"] == "traced" and manifest["config"]["decoder"] == "traced"
