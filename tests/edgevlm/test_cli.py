"""The CLI starts without torch, bad input is one line on stderr with exit code 2, and each
command ends with the next one to run, on the paths it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.cli.next_steps import after_bench, after_distill, after_quantize, after_train

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


def test_shapes_and_init_name_the_next_command(tmp_path):
    runner = CliRunner()
    data = tmp_path / "shapes"
    r = runner.invoke(app, ["data", "shapes", str(data), "--train", "4", "--eval", "2"])
    assert r.exit_code == 0, r.output
    model0 = tmp_path / "teacher0"
    assert r.stderr.startswith(f"next: edgevlm init {model0} --preset tiny-teacher "
                               f"--tokenizer-data {data / 'train.json'} ")
    assert (f"edgevlm train {model0} {data / 'train.json'} {data / 'pretrain.json'} --out "
            f"{tmp_path / 'teacher'}") in r.stderr
    r = runner.invoke(app, ["init", str(model0), "--preset", "tiny-teacher", "--tokenizer-data",
                            str(data / "train.json")])
    assert r.exit_code == 0, r.output
    assert r.stderr == (f"next: edgevlm train {model0} {data / 'train.json'} --out "
                        f"{tmp_path / 'teacher'}\n")
    # --json and --quiet: the summary alone
    r = runner.invoke(app, ["data", "shapes", str(tmp_path / "j"), "--train", "4", "--eval", "2",
                            "--json"])
    assert json.loads(r.stdout)["eval"] == 2 and "next:" not in r.output
    r = runner.invoke(app, ["data", "shapes", str(tmp_path / "q"), "--train", "4", "--eval", "2",
                            "--quiet"])
    assert r.exit_code == 0 and r.output == ""


def test_next_commands_carry_the_real_paths(tmp_path):
    data = tmp_path / "my shapes"  # a space: quoted for the shell
    data.mkdir()
    (data / "eval.json").write_text("[]")
    q = f"'{data}"
    assert after_train(tmp_path / "teacher", [data / "train.json"]) == [
        f"edgevlm eval {tmp_path / 'teacher'} {q}/eval.json'"]
    w4 = tmp_path / "student-w4"
    assert after_quantize(w4, 4, 128, data / "train.json") == [
        f"edgevlm export {w4} --out {tmp_path / 'student-w4-onnx'} --precision int4"]
    assert after_quantize(w4, 8, -1, None)[0].endswith("--precision int8")
    # a width export does not carry is evaluated instead
    assert after_quantize(w4, 3, 128, data / "train.json") == [
        f"edgevlm eval {w4} {q}/eval.json'"]
    run = tmp_path / "student"
    assert after_distill(run, run / "final", tmp_path / "train.json") == [
        f"edgevlm quantize {run / 'final'} --out {tmp_path / 'student-w4'} --calib "
        f"{tmp_path / 'train.json'}",
        f"edgevlm export {run / 'final'} --out {tmp_path / 'student-onnx'} --precision int4"]
    assert after_bench(None) == []
    assert after_bench(tmp_path / "r") == [
        f"edgevlm plan --reports {tmp_path / 'r' / 'bench.json'} --max-ttft-ms MS"]
