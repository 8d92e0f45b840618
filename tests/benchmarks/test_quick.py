"""The benchmark scripts' --quick modes, run as a user runs them (`python -m benchmarks...` from
the repository root) into a tmp folder, and the harness they share (benchmarks/harness.py).

Each quick run is real (tiny models trained and measured here, nothing mocked); what is checked
is what a run must record: its keys, finite numbers in their ranges, the command with paths
relative to the repository, the commit and the machine. None may write into benchmarks/results.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def _run(module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _numbers(value):
    """Every number in a JSON value, at any depth."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def _check_record(result: dict, module: str, md: Path | None = None) -> None:
    """The run's record: its command as typed, paths relative; the commit; the machine."""
    command = result["command"]
    assert re.match(rf"(nice )?python -m {re.escape(module)}( |$)", command), command
    assert str(ROOT) not in command
    commit = result["commit"]  # a commit of this checkout (HEAD may move on while tests run)
    assert re.fullmatch(r"[0-9a-f]{7,40}", commit), commit
    assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0
    assert isinstance(result["uncommitted_changes"], bool)
    machine = result["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["memory_gb"] > 0
    assert all(math.isfinite(x) for x in _numbers(result)), "a NaN or an infinity"
    if md is not None:
        assert f"Run: `{command}` at commit {commit}" in md.read_text()


def _in_unit(stat: dict) -> None:
    assert 0 <= stat["min"] <= stat["mean"] <= stat["max"] <= 1 and stat["std"] >= 0


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
    """No quick run (nor anything else here) writes into the committed results."""
    def snapshot():
        return {p: p.stat().st_mtime_ns for p in RESULTS.rglob("*")}

    before = snapshot()
    yield
    assert snapshot() == before


@pytest.fixture(scope="module")
def harness():
    """benchmarks/harness.py, imported as the scripts import it: from the repository root (on
    sys.path under `python -m pytest`, not under a plain `pytest`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield importlib.import_module("benchmarks.harness")


@pytest.fixture(scope="module")
def tiny(harness, tmp_path_factory) -> tuple[Path, Path]:
    """(shapes folder, teacher): what a --quick run makes for itself, made once for all here."""
    return harness.quick_teacher(tmp_path_factory.mktemp("quick"))


# -- the harness ------------------------------------------------------------------------------

def test_relative_writes_paths_inside_the_repository_from_its_root(harness):
    assert harness.relative(str(ROOT / "runs" / "teacher")) == "runs/teacher"
    assert harness.relative(f"G={ROOT / 'runs' / 'gptq'}") == "G=runs/gptq"
    assert harness.relative(f"--out={RESULTS}") == "--out=benchmarks/results"
    assert harness.relative("/tmp/elsewhere") == "/tmp/elsewhere"
    assert harness.relative("runs/teacher") == "runs/teacher"
    assert harness.relative("0,1,2") == "0,1,2"


def test_run_step_times_a_command_and_reads_its_own_peak_memory(harness, tmp_path):
    code = "import sys; x = bytearray(80_000_000); print('out'); print('err', file=sys.stderr)"
    step = harness.run_step([sys.executable, "-c", code], capture=True)
    assert step.command.startswith("python -c ")
    assert (step.stdout, step.stderr, step.returncode) == ("out\n", "err\n", 0)
    assert step.seconds > 0 and step.peak_rss_bytes >= 80_000_000
    assert set(step.to_dict()) == {"command", "seconds", "returncode", "peak_rss_bytes"}
    assert harness.run_step(["false"], skip_if=tmp_path).skipped
    with pytest.raises(subprocess.CalledProcessError):
        harness.run_step([sys.executable, "-c", "raise SystemExit(3)"], capture=True)
    assert harness.run_step([sys.executable, "-c", "raise SystemExit(3)"], capture=True,
                            check=False).returncode == 3


def test_write_puts_the_record_first_and_the_run_line_under_the_table(harness, tmp_path):
    record = harness.Record.start("benchmarks.quant.ranking", ["--out", str(RESULTS / "x")])
    path = harness.write(tmp_path / "r", {"command": "an earlier run's", "rows": [1.5]},
                         "| a |\n|---|", record)
    result = json.loads(path.read_text())
    assert list(result)[:5] == ["command", "commit", "uncommitted_changes", "machine", "started"]
    assert result["rows"] == [1.5]
    _check_record(result, "benchmarks.quant.ranking", tmp_path / "r.md")
    assert result["command"].endswith("--out benchmarks/results/x")


@pytest.mark.slow
def test_every_script_shows_its_help(harness, capsys, monkeypatch):
    found = [module for module, _ in importlib.import_module("benchmarks.__main__").scripts()]
    assert len(found) >= 26 and "benchmarks.smollm2" in found
    for module in found:
        monkeypatch.setattr(sys, "argv", [module, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        assert done.value.code == 0, module
        assert f"usage: python -m {module} " in capsys.readouterr().out


# -- the quick modes --------------------------------------------------------------------------

@pytest.mark.slow
def test_kd_ablation_quick(tiny, tmp_path):
    data, teacher = tiny
    # rows (a) no teacher and (e) the full recipe: the ends of the table, every stage between
    _run("benchmarks.distill.kd_ablation", "--quick", "--rows", "ae", "--teacher", teacher,
         "--data", data, "--work", tmp_path / "work", "--out", tmp_path)
    result = json.loads((tmp_path / "kd_ablation.json").read_text())
    _check_record(result, "benchmarks.distill.kd_ablation", tmp_path / "kd_ablation.md")
    assert result["quick"] and result["errors"] == [] and result["seeds"] == [0, 1]
    assert set(result["rows"]) == {"a", "e"} and len(result["runs"]) == 4
    assert set(result["rows"]["e"]["steps"]) == {"dpt", "sft", "dft"}
    for row in result["rows"].values():
        _in_unit(row["accuracy"])
        assert row["accuracy"]["n"] == 2 and row["kl_to_teacher"]["min"] >= 0
        assert sum(row["steps"].values()) == result["total_steps"]


@pytest.mark.slow
def test_mod_ablation_quick(tiny, tmp_path):
    data, teacher = tiny
    # every kind of row but `random` (mimic's code path with random experts)
    _run("benchmarks.distill.mod_ablation", "--quick", "--rows", "kd,mimic,pref,top1",
         "--teacher", teacher, "--data", data, "--work", tmp_path / "work", "--out", tmp_path)
    result = json.loads((tmp_path / "mod_ablation.json").read_text())
    _check_record(result, "benchmarks.distill.mod_ablation", tmp_path / "mod_ablation.md")
    rows = {"kd", "mimic", "pref", "top1", "teacher"}
    assert result["errors"] == [] and set(result["rows"]) == rows == set(result["decode"])
    for name, row in result["rows"].items():
        _in_unit(row["accuracy"])
        _in_unit(row["hallucination"])
        assert 0 < row["activated"] <= row["total"]
        assert result["decode"][name]["decode_tokens_per_s"] > 0
    # the MoE rows hold more parameters than they run; top-1 runs about what the dense student
    # runs (its router aside), top-2 more
    rows = result["rows"]
    assert rows["mimic"]["activated"] < rows["mimic"]["total"]
    assert rows["top1"]["activated"] < rows["mimic"]["activated"]
    assert abs(rows["top1"]["activated"] / rows["kd"]["total"] - 1) < 0.01


@pytest.mark.slow
def test_quant_ablation_quick(tiny, tmp_path):
    data, teacher = tiny
    _run("benchmarks.quant.ablation", "--quick", "--model", teacher, "--data", data,
         "--work", tmp_path / "work", "--out", tmp_path)
    result = json.loads((tmp_path / "quant_ablation_teacher_quick.json").read_text())
    _check_record(result, "benchmarks.quant.ablation",
                  tmp_path / "quant_ablation_teacher_quick.md")
    assert result["errors"] == [] and result["meta"]["quick"]
    methods = {(r["setting"], r["method"]) for r in result["rows"] if r["table"] == "main"}
    assert methods == {("FP", "fp"), ("W3 g128", "rtn"), ("W3 g128", "gptq"),
                       ("W3 g128", "qvlm"), ("W4A4 (simulated)", "rtn")}
    ablation = [r for r in result["rows"] if r["table"] == "ablation"]
    assert [r["variant"] for r in ablation] == ["max block 1 (layer-wise)"]
    assert ablation[0]["seeds"][0]["blocks"] == [[0], [1]]  # layer-wise: one layer a block
    w4a4 = next(r for r in result["rows"] if r["setting"] == "W4A4 (simulated)")
    assert 0 < w4a4["seeds"][0]["mean_act_clip"] <= 1  # activations clipped by the search
    for row in result["rows"]:
        _in_unit(row["accuracy"])
        assert row["kl"]["min"] >= 0 and (row["method"] != "fp" or row["kl"]["max"] == 0)
    assert result["meta"]["fp_accuracy"] == result["rows"][0]["accuracy"]["mean"]


@pytest.mark.slow
def test_device_readiness_quick(tmp_path):
    _run("benchmarks.export.device_readiness", "--quick", "--work", tmp_path / "work",
         "--out", tmp_path)
    result = json.loads((tmp_path / "device_readiness.json").read_text())
    _check_record(result, "benchmarks.export.device_readiness",
                  tmp_path / "device_readiness.md")
    assert list(result["presets"]) == ["tiny-student"]
    preset = result["presets"]["tiny-student"]
    for kind in ("plain", "mobile"):
        for eps in preset[kind]["components"].values():
            assert all(0 <= ep["share"] <= 1 for ep in eps.values())
    # the mobile profile meets the targets docs/devices.md states, on every provider
    for component, target in preset["mobile"]["targets"].items():
        for ep in preset["mobile"]["components"][component].values():
            assert ep["share"] >= target["min_share"]
            assert ep["partitions"] <= target["max_partitions"]
    assert len(result["steps"]) == 4  # data shapes, init, plain and mobile export
    for step in result["steps"]:
        assert step["command"].startswith("python -m edgevlm.cli ")
        assert step["seconds"] > 0 and step["peak_rss_bytes"] > 0 and step["returncode"] == 0


def test_ranking_remakes_the_committed_table(tmp_path):
    _run("benchmarks.quant.ranking", "--results", RESULTS, "--out", tmp_path / "ranking")
    result = json.loads((tmp_path / "ranking.json").read_text())
    _check_record(result, "benchmarks.quant.ranking", tmp_path / "ranking.md")
    assert "--results benchmarks/results" in result["command"]

    def table(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert table(tmp_path / "ranking.md") == table(RESULTS / "smollm2_ranking.md")
    assert result["rows"][0]["setting"] == "FP" and len(result["rows"]) == len(
        table(RESULTS / "smollm2_ranking.md")) - 2
