"""What `bench --report` and `plan --out` write (issue 33): names are printed as they are, never
as rich markup; a write that fails (disk full, read-only file system, a file in the way) is one
line and keeps what bench measured; an existing folder is replaced only with --overwrite."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgevlm.bench import report as report_module
from edgevlm.bench.report import load_report
from edgevlm.cli import app
from edgevlm.errors import UserError
from tests.bench.conftest import FAST

MARKUP = "[bold red]x[/bold red][/b]"  # "[/b]" closes nothing: rich would raise on it


def _fast_args() -> list[str]:
    return [a for k, v in FAST.items() for a in ("--" + k.replace("_", "-"), str(v))]


def _bench(export_dir, shapes_dir, *args):
    return CliRunner().invoke(app, ["bench", str(export_dir), "--data",
                                    str(shapes_dir / "eval.json"), *_fast_args(), *args])


def _marked(bench_json, tmp_path) -> Path:
    """A copy of the report whose target name, device and data hold markup."""
    d = json.loads(bench_json.read_text())
    machine = next(iter(d["machines"].values()))
    d["machines"] = {MARKUP: {**machine, "label": MARKUP}, "[i]": {**machine, "label": "[i]"}}
    d["data"] = f"{MARKUP}/eval.json"
    d["targets"] = [{**t, "name": MARKUP, "family": "[u]llava", "device": MARKUP}
                    for t in d["targets"]]
    path = tmp_path / "[bold]report.json"
    path.write_text(json.dumps(d))
    return path


def test_names_with_markup_are_printed_as_they_are(bench_json, tmp_path):
    path = _marked(bench_json, tmp_path)
    run = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["plan", "--reports", str(path),
                                                         "--out", str(tmp_path / "p")])
    assert run.exit_code == 0, run.output
    assert f"* {MARKUP}" in run.stdout and "[u]llava" in run.stdout
    assert f"chosen: {MARKUP} ({path})" in run.stderr
    assert f"wrote {tmp_path / 'p' / 'plan.json'}" in run.stderr
    run = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["bench", "--compare", str(path),
                                                         "--report", str(tmp_path / "r")])
    assert run.exit_code == 0, run.output
    assert run.stdout.count(MARKUP) >= 3  # the data in the title, the device, the name
    assert f"wrote {tmp_path / 'r' / 'bench.json'}" in run.stderr


def _failing_write(code: int):
    def write(path, text):
        raise OSError(code, os.strerror(code), str(path))
    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_report_write_keeps_the_measurements(export_dir, shapes_dir, tmp_path,
                                                      monkeypatch, code):
    """Disk full or read-only once measured: one line naming the reason and where the results
    are, the report folder untouched, and `--compare` writes the report from the kept file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(report_module, "_write_text", _failing_write(code))
    run = _bench(export_dir, shapes_dir, "--report", str(tmp_path / "r"), "--quiet")
    message = str(run.exception)
    assert isinstance(run.exception, UserError) and "\n" not in message, run.output
    assert os.strerror(code) in message
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))
    kept = next((tmp_path / "tmp").glob("edgevlm-bench-*.json"))
    assert f"saved in {kept}" in message and f"--compare {kept} --report DIR" in message
    assert load_report(kept).targets[0].total == FAST["limit"]
    monkeypatch.undo()
    run = CliRunner().invoke(app, ["bench", "--compare", str(kept), "--report",
                                   str(tmp_path / "r"), "--quiet"])
    assert run.exit_code == 0, run.output
    assert load_report(tmp_path / "r").targets == load_report(kept).targets


def test_when_even_the_fallback_fails_the_measurements_go_to_stdout(export_dir, shapes_dir,
                                                                    tmp_path, monkeypatch):
    (tmp_path / "tmp").write_text("a file where the temporary folder should be")
    monkeypatch.setattr("edgevlm.cli.device._fallback_path", lambda: tmp_path / "tmp" / "b.json")
    monkeypatch.setattr(report_module, "_write_text", _failing_write(errno.ENOSPC))
    run = _bench(export_dir, shapes_dir, "--report", str(tmp_path / "r"), "--quiet")
    assert isinstance(run.exception, UserError), run.output
    assert "measurements are printed on stdout" in str(run.exception)
    assert json.loads(run.stdout)["targets"][0]["total"] == FAST["limit"]


@pytest.mark.parametrize("where,match", [
    ("file/report", "--report {out} cannot be made: {file} is a file"),
    ("file", "{out} already exists; choose another output or pass --overwrite"),
])
def test_a_report_location_that_cannot_be_written_is_refused_before_measuring(
        export_dir, shapes_dir, tmp_path, monkeypatch, where, match):
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / where
    measured = []
    monkeypatch.setattr("edgevlm.bench.harness.bench", lambda *a, **k: measured.append(1))
    run = _bench(export_dir, shapes_dir, "--report", str(out))
    assert isinstance(run.exception, UserError), run.output
    assert str(run.exception).startswith(match.format(out=out, file=tmp_path / "file"))
    assert not measured


def test_a_read_only_place_is_refused_before_measuring(export_dir, shapes_dir, tmp_path,
                                                       monkeypatch):
    """EROFS: access(2) says a read-only file system is not writable, even for root."""
    real = os.access
    monkeypatch.setattr("edgevlm.cli.device.os.access",
                        lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    run = _bench(export_dir, shapes_dir, "--report", str(tmp_path / "r"))
    assert isinstance(run.exception, UserError), run.output
    assert f"{tmp_path} is read-only" in str(run.exception)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_plan_write_is_one_line(bench_json, tmp_path, monkeypatch, code):
    from edgevlm.bench import plan as planner

    def write(result, out_dir, note=""):
        raise OSError(code, os.strerror(code), str(Path(out_dir) / "plan.json"))

    monkeypatch.setattr(planner, "write", write)
    run = CliRunner().invoke(app, ["plan", "--reports", str(bench_json), "--out",
                                   str(tmp_path / "p")])
    assert isinstance(run.exception, UserError) and "\n" not in str(run.exception)
    assert str(run.exception).startswith(f"could not write the plan to {tmp_path / 'p'} "
                                         f"({os.strerror(code)}")
    assert "chosen:" in run.stderr  # the plan was printed before the write
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.*"))


def test_a_file_in_the_way_of_plan_out_is_one_line(bench_json, tmp_path):
    (tmp_path / "file").write_text("in the way")
    run = CliRunner().invoke(app, ["plan", "--reports", str(bench_json), "--out",
                                   str(tmp_path / "file" / "p")])
    assert isinstance(run.exception, UserError), run.output
    assert "is a file" in str(run.exception)


def test_existing_folders_are_replaced_only_with_overwrite(bench_json, tmp_path):
    """As every other OUT: refused without --overwrite (files untouched), replaced with it,
    and never when OUT holds an input."""
    for cmd, flag in ((["bench", "--compare", str(bench_json)], "--report"),
                      (["plan", "--reports", str(bench_json)], "--out")):
        out = tmp_path / flag.strip("-")
        out.mkdir()
        (out / "bench.json").write_text("an earlier report")
        run = CliRunner().invoke(app, [*cmd, flag, str(out), "--json"])
        assert isinstance(run.exception, UserError), run.output
        assert str(run.exception) == (f"{out} already exists; choose another output or pass "
                                      "--overwrite")
        assert (out / "bench.json").read_text() == "an earlier report"
        run = CliRunner().invoke(app, [*cmd, flag, str(out), "--overwrite", "--json"])
        assert run.exit_code == 0, run.output
        assert not (out / "bench.json").is_file() or load_report(out).targets
    run = CliRunner().invoke(app, ["bench", "--compare", str(bench_json), "--report",
                                   str(bench_json.parent), "--overwrite"])
    assert "lies inside the input" in str(run.exception)


def test_plan_out_is_replaced_with_overwrite_after_an_earlier_plan(bench_json, tmp_path):
    """An earlier `plan --out` folder holds plan.json, an artifact marker: --overwrite
    replaces it (it was refused as a folder of the user's own files)."""
    out = tmp_path / "plan"
    cmd = ["plan", "--reports", str(bench_json), "--out", str(out), "--json"]
    assert CliRunner().invoke(app, cmd).exit_code == 0
    assert (out / "plan.json").is_file()
    run = CliRunner().invoke(app, [*cmd, "--overwrite"])
    assert run.exit_code == 0, run.output
    assert (out / "plan.json").is_file()
