"""`edgevlm bench`: the export's answers and accuracy equal the torch reference's, every figure
is there, sizes match the files, the report files and --compare, bad input, no torch needed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from edgevlm.bench.harness import BenchConfig, bench
from edgevlm.bench.report import Spread, load_report, merge, write_report
from edgevlm.cli import app
from edgevlm.data.metrics import exact_match
from edgevlm.errors import UserError

NEW_TOKENS = 4
N_SAMPLES = 6
CFG = BenchConfig(warmup=1, repeats=2, max_new_tokens=NEW_TOKENS, provider="cpu", threads=1,
                  timing_samples=2)
TORCH = "edgevlm.bench.torch_target:TorchTarget"  # what the CLI hands the runtime for model folders


@pytest.fixture(scope="module")
def bench_data(shapes_dir, model_dir, tmp_path_factory):
    """Shapes questions whose every other answer is replaced by the torch model's own greedy
    answer, so accuracy is well above zero and known before the bench runs."""
    from edgevlm.data import load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.models import load_model

    rows = json.loads((shapes_dir / "eval.json").read_text())[:N_SAMPLES]
    samples = load_samples(shapes_dir / "eval.json")[:N_SAMPLES]
    answers = generate_answers(load_model(model_dir), samples, NEW_TOKENS, batch_size=1)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        if i % 2 == 0:
            row["conversations"][-1]["value"] = answer
    path = tmp_path_factory.mktemp("bench_data") / "eval.json"
    path.write_text(json.dumps(rows))
    refs = [r["conversations"][-1]["value"] for r in rows]
    expected = sum(exact_match(a, r) for a, r in zip(answers, refs)) / N_SAMPLES
    return path, answers, expected


@pytest.fixture(scope="module")
def report(bench_data, model_dir, export_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_report")
    result = bench([model_dir, export_dir], bench_data[0], CFG, image_root=shapes_dir,
                   model_target=TORCH)
    return result, out, write_report(result, out)


@pytest.mark.slow
def test_export_answers_and_accuracy_equal_torch(report, bench_data):
    _, answers, expected = bench_data
    torch_t, export_t = report[0].targets
    assert (torch_t.backend, export_t.backend) == ("transformers", "onnxruntime")
    assert [p["prediction"] for p in torch_t.predictions] == answers
    assert [p["prediction"] for p in export_t.predictions] == answers
    assert expected >= 0.5
    for t in (torch_t, export_t):
        assert t.accuracy == pytest.approx(expected)
        assert (t.correct, t.total) == (round(expected * N_SAMPLES), N_SAMPLES)
        assert set(t.per_type) == {p["type"] for p in t.predictions}
    assert torch_t.per_type == export_t.per_type


def test_every_figure_is_measured(report):
    result = report[0]
    assert result.n_samples == N_SAMPLES and len(result.machines) == 1
    machine = next(iter(result.machines.values()))
    assert machine.cpu and machine.logical_cores >= 1 and machine.ram_bytes > 0
    assert {"numpy", "onnxruntime"} <= set(machine.versions)
    for t in result.targets:
        assert t.device == machine.label and t.provider == "cpu" and t.precision == "fp32"
        assert t.timed_runs == CFG.repeats * CFG.timing_samples
        for spread in (t.ttft_s, t.vision_s, t.prefill_s, t.decode_tokens_per_s):
            assert spread.n == t.timed_runs
            assert 0 < spread.p10 <= spread.median <= spread.p90 < math.inf
        # TTFT covers preprocessing, the vision encoder and prefill.
        assert t.ttft_s.median > t.prefill_s.median
        assert t.n_prompt_tokens > 9 and t.mean_new_tokens == NEW_TOKENS
        assert 0 < t.baseline_rss_bytes <= t.loaded_rss_bytes <= t.peak_rss_bytes
        assert t.load_s > 0
    torch_t, export_t = result.targets
    assert {"torch", "transformers"} <= set(torch_t.versions)
    assert "onnxruntime" in export_t.versions
    # A runtime process without torch is far smaller than the reference's.
    assert export_t.peak_rss_bytes < torch_t.peak_rss_bytes


def test_sizes_match_the_files(report, model_dir, export_dir):
    torch_t, export_t = report[0].targets
    # Not the genai graph: edgevlm.runtime does not load it (its weights are the decoder's).
    graphs = sorted(p for p in (export_dir / "onnx").iterdir()
                    if not p.name.startswith("genai_"))
    assert sorted(export_t.files) == [f"onnx/{p.name}" for p in graphs]
    assert export_t.disk_bytes == sum(p.stat().st_size for p in graphs)
    assert torch_t.files == ["model.safetensors"]
    assert torch_t.disk_bytes == (model_dir / "model.safetensors").stat().st_size


def test_report_files(report):
    result, out, written = report
    assert [p.name for p in written] == ["bench.json", "bench.md", "bench.png"]
    assert load_report(out / "bench.json") == result  # the JSON holds every figure
    md = (out / "bench.md").read_text()
    assert md.count("| model |") == 2 and md.count("| export |") == 2  # speed + per-type rows
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_empty_spread_is_null_in_json(report, tmp_path):
    """Answers that all stop at their first token have no decode rate: strict JSON, not NaN."""
    result = report[0]
    target = replace(result.targets[1], decode_tokens_per_s=Spread.of([math.nan]))
    write_report(replace(result, targets=[target]), tmp_path)
    text = (tmp_path / "bench.json").read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in bench.json"))
    loaded = load_report(tmp_path).targets[0].decode_tokens_per_s
    assert loaded.n == 0 and math.isnan(loaded.median)
    assert "| – |" in (tmp_path / "bench.md").read_text()


def test_compare_merges_devices(report, tmp_path):
    result, out, _ = report
    other = tmp_path / "other"
    write_report(merge([result], ["x"]), other)  # a second device's report
    merged_dir = tmp_path / "merged"
    run = CliRunner().invoke(app, ["bench", "--compare", str(out / "bench.json"),
                                   str(other / "bench.json"), "--report", str(merged_dir),
                                   "--json"])
    assert run.exit_code == 0, run.output
    merged = load_report(merged_dir)
    label = next(iter(result.machines))
    assert list(merged.machines) == [label, f"{label}#2"]
    assert [t.device for t in merged.targets] == [label, label, f"{label}#2", f"{label}#2"]
    assert json.loads(run.stdout)["sources"] == [str(out / "bench.json"),
                                                  str(other / "bench.json")]
    md = (merged_dir / "bench.md").read_text()
    assert f"| {label}#2 | export |" in md and (merged_dir / "bench.png").is_file()


def test_cli_bench_export(export_dir, bench_data, shapes_dir, tmp_path):
    run = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
                                   "bench", str(export_dir), "--data", str(bench_data[0]),
                                   "--image-root", str(shapes_dir), "--limit", "2",
                                   "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2",
                                   "--timing-samples", "1", "--provider", "cpu", "--threads",
                                   "1", "--report", str(tmp_path / "r")])
    assert run.exit_code == 0, run.output
    assert "export" in run.stdout and "TTFT" in run.stdout
    t = load_report(tmp_path / "r").targets[0]
    assert t.total == 2 and t.timed_runs == 1


@pytest.mark.slow
def test_text_only_samples_are_answered_by_both_backends(model_dir, export_dir, bench_data,
                                                         shapes_dir, tmp_path):
    """LLaVA-665k's text-only conversations: the runtime answers them with no image (vision 0
    ms), token for token as the torch reference does, and they count in the accuracy."""
    rows = json.loads(bench_data[0].read_text())[:2]
    rows.insert(0, {"id": "sharegpt-1", "conversations": [
        {"from": "human", "value": "What color is the square?"},
        {"from": "gpt", "value": "red"}]})
    (tmp_path / "mix.json").write_text(json.dumps(rows))
    cfg = replace(CFG, repeats=1, timing_samples=1)  # the timed sample is the text-only one
    result = bench([model_dir, export_dir], tmp_path / "mix.json", cfg, image_root=shapes_dir,
                   model_target=TORCH)
    torch_t, export_t = result.targets
    assert result.n_samples == 3 and torch_t.total == export_t.total == 3
    assert [p["prediction"] for p in export_t.predictions] == [
        p["prediction"] for p in torch_t.predictions]
    assert [p["id"] for p in export_t.predictions][0] == "sharegpt-1"
    assert torch_t.vision_s.median == 0.0 and export_t.vision_s.median < 1e-4  # no encoder run
    assert export_t.accuracy == torch_t.accuracy


def test_bad_input(tmp_path, export_dir, model_dir, bench_data, shapes_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither edgevlm.json nor config.json"):
        bench([tmp_path / "empty"], bench_data[0], CFG)
    with pytest.raises(UserError, match="does not exist"):
        bench([tmp_path / "missing"], bench_data[0], CFG)
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(UserError, match="no entries"):
        bench([export_dir], tmp_path / "none.json", CFG)
    with pytest.raises(UserError, match="no bench target"):
        bench([], bench_data[0], CFG)
    with pytest.raises(UserError, match="model folder, which runs on the toolkit's torch"):
        bench([export_dir, model_dir], bench_data[0], CFG)  # no torch reference was handed in
    with pytest.raises(UserError, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(UserError, match="tpu"):
        BenchConfig(provider="tpu")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    for args, match in ((["--compare", str(tmp_path / "x.json")], "not a bench report"),
                        (["--compare", str(tmp_path / "nope.json")], "does not exist"),
                        ([str(export_dir)], "--data")):
        run = CliRunner().invoke(app, ["bench", *args])
        assert isinstance(run.exception, UserError) and match in str(run.exception), args


# The blocker lives in a sitecustomize on PYTHONPATH, so the per-target worker processes that
# bench starts are blocked too.
BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision", "accelerate"):
            raise ImportError(f"{name} is blocked in the lean-import test")
        return None

sys.meta_path.insert(0, Block())
"""

SCRIPT = """
import sys
from edgevlm.bench.harness import BenchConfig, bench
from edgevlm.bench.report import write_report

export_dir, data, root, out = sys.argv[1:5]
cfg = BenchConfig(limit=2, warmup=0, repeats=1, max_new_tokens=2, provider="cpu",
                  timing_samples=1)
report = bench([export_dir], data, cfg, image_root=root)
write_report(report, out)
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
"""


def test_bench_of_an_export_needs_no_torch(export_dir, bench_data, shapes_dir, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(export_dir), str(bench_data[0]),
                           str(shapes_dir), str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_report(tmp_path / "r").targets[0].total == 2
    # ... and the blocker works: a model folder fails for want of torch.
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert proc.returncode != 0


def test_target_labels_name_the_model_not_the_stage():
    from pathlib import Path

    from edgevlm.bench.harness import _names

    paths = [Path("runs/teacher"), Path("runs/student-distill/final"), Path("a/export"),
             Path("b/export")]
    assert _names(paths) == ["teacher", "student-distill/final", "a/export", "b/export"]


def _target(name: str, accuracy: float, ttft_ms: float, rate: float, peak_mb: float,
            disk_mb: float, device: str = "host"):
    """A TargetReport built directly: the terminal table needs no model run."""
    from edgevlm.bench.report import TargetReport

    def spread(v):
        return Spread(v, 0.9 * v, 1.1 * v, 4)

    return TargetReport(
        name=name, path=f"/runs/{name}", kind="export", backend="onnxruntime", provider="cpu",
        precision="int4", threads=None, accuracy=accuracy, correct=round(300 * accuracy),
        total=300, per_type={"color": accuracy, "count": 1 - accuracy},
        ttft_s=spread(ttft_ms / 1e3), vision_s=spread(0.004), prefill_s=spread(0.006),
        decode_tokens_per_s=spread(rate), preprocess_s=spread(0.001), n_prompt_tokens=80,
        mean_new_tokens=8.0, timed_runs=4, load_s=0.5, baseline_rss_bytes=int(90e6),
        loaded_rss_bytes=int(200e6), peak_rss_bytes=int(peak_mb * 1e6),
        disk_bytes=int(disk_mb * 1e6), files=["onnx/decoder.onnx"], versions={}, predictions=[],
        device=device)


LONG = ["runs/smollm2-llava-qvlm-w4-g128-v_proj8/export-int4-visionzip-49",
        "runs/smollm2-llava-gptq-w4-g128-act-order/export-int4-divprune-196",
        "runs/student-distill/final", "runs/teacher-trained-on-llava-665k-and-pretrain"]


@pytest.mark.parametrize("names,devices", [
    (["teacher", "student-distill/final", "export"], ["host"]),  # the demo's: one row each
    (LONG, ["host"]),  # too long for a row: one block per target
    (LONG[:3], ["pixel-8-pro.local", "jetson-orin-nano-devkit"]),  # --compare of two devices
])
def test_the_terminal_table_fits_80_columns_and_cuts_nothing(names, devices):
    from rich.console import Console

    from edgevlm.bench.report import BenchReport, Machine
    from edgevlm.cli.device import bench_view

    figures = [(0.637, 12345.6, 1234.5, 12345, 1234.56), (0.5, 8.25, 150.2, 312, 12.35),
               (1.0, 0.4, 87.0, 95, 0.57), (0.0333, 1234.5, 3.4, 4096, 350.0)]
    targets = [_target(n, *f, device=devices[i % len(devices)])
               for i, (n, f) in enumerate(zip(names, figures))]
    machine = Machine("host", "cpu", 2, 1, None, "linux", "3.12", {})
    report = BenchReport("", "runs/shapes/eval.json", 300, {},
                         {d: replace(machine, label=d) for d in devices}, targets, [],
                         note="smoke test (--quick): tiny settings")
    console = Console(width=80, record=True)
    console.print(bench_view(report, 80))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "smoke test" in text
    for t, (acc, ttft, rate, peak, disk) in zip(targets, figures):
        assert t.name in text
        for cell in (f"{100 * acc:.1f}%", f"{ttft:.1f}", f"{rate:.1f}", f"{peak}",
                     f"{disk:.2f}"):
            assert cell in text, (cell, text)
    if len(devices) > 1:
        assert all(d in text for d in devices)
    # bench.md: every column, and the one accuracy unit
    from edgevlm.bench.report import to_markdown

    md = to_markdown(report)
    assert "| 63.7% (191/300) |" in md and "| 63.7% | 36.3% |" in md
    assert md.splitlines()[2] == "**smoke test (--quick): tiny settings**"
