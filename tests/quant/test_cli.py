"""`edgevlm quantize`: JSON summary on success, one clear line and exit 2 on bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.errors import UserError


def test_cli_quantize_rtn_json_and_errors(micro_model_dir, shapes_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q"
    args = ["quantize", str(micro_model_dir), "--out", str(out), "--method", "rtn",
            "--group-size", "64", "--bits", "3", "--symmetric", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["method"] == "rtn" and summary["layers"] == 14 and summary["bits"] == 3
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    # main() turns a UserError into one line and exit code 2; the runner hands it back.
    again = runner.invoke(app, args)
    assert isinstance(again.exception, UserError) and "already exists" in str(again.exception)
    bad = runner.invoke(app, args[:-1] + ["--bits", "9", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, UserError) and "2..8" in str(bad.exception)
    nf4 = runner.invoke(app, ["quantize", str(micro_model_dir), "--out", str(tmp_path / "n"),
                              "--method", "nf4"])
    assert isinstance(nf4.exception, UserError) and "BitsAndBytesConfig" in str(nf4.exception)
    assert not (tmp_path / "n").exists()


def test_cli_layer_bits(micro_model_dir, tmp_path):
    runner = CliRunner()
    args = ["quantize", str(micro_model_dir), "--method", "rtn", "--group-size", "32", "--json"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "q"), "--layer-bits", "v_proj=8"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    # per layer v_proj holds 32 x 64 of q, k, v, o, gate, up, down's 36,864 weights
    assert summary["layer_bits"] == {"v_proj": 8}
    assert abs(summary["weight_bits_mean"] - (4 + 4 * 2048 / 36864)) < 1e-9
    bad = runner.invoke(app, args + ["--out", str(tmp_path / "x"), "--layer-bits", "v_proj"])
    assert isinstance(bad.exception, UserError) and "is not NAME=BITS" in str(bad.exception)
    assert not (tmp_path / "x").exists()
