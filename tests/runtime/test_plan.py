"""`edgevlm plan` on bench reports made in the test: the most accurate point inside the
budget, the Pareto front, one-line errors for a budget no point meets (with the closest) and
for reports of different eval sets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgevlm.bench.plan import Candidate, pareto, plan
from edgevlm.errors import UserError


@pytest.fixture(scope="module")
def report(micro_model_dir, shapes_dir, tmp_path_factory):
    """A real bench report: the micro model's fp32 and int4 exports on 8 questions."""
    from edgevlm.export import ExportConfig, export

    root = tmp_path_factory.mktemp("plan")
    for precision in ("fp32", "int4"):
        export(micro_model_dir, root / precision,
               ExportConfig(precision=precision, validate=False, block_size=32))
    out = root / "report"
    r = subprocess.run([sys.executable, "-m", "edgevlm.cli", "bench", root / "fp32",
                        root / "int4", "--data", shapes_dir / "eval.json", "--limit", "8",
                        "--timing-samples", "2", "--repeats", "1", "--max-new-tokens", "2",
                        "--report", out, "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "bench.json"


def variant(report, tmp_path, name: str, **changes) -> str:
    """A copy of the report whose targets are renamed and changed (a second candidate set
    measured on the same eval set)."""
    d = json.loads(report.read_text())
    for t in d["targets"]:
        t["name"] = f"{name}-{t['name']}"
        for k, v in changes.items():
            if k == "ttft_ms":
                t["ttft_s"]["median"] = v / 1e3
            else:
                t[k] = v
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_reports_carry_what_the_planner_needs(report):
    d = json.loads(report.read_text())
    facts = {t["name"]: (t["family"], t["visual_tokens"], t["weight_bits"]) for t in d["targets"]}
    assert facts == {"fp32": ("llava", 9, 32), "int4": ("llava", 9, 4)}


def test_the_most_accurate_point_inside_the_budget_is_chosen(report, tmp_path):
    fast = variant(report, tmp_path, "fast", ttft_ms=5.0, accuracy=0.5)
    good = variant(report, tmp_path, "good", ttft_ms=50.0, accuracy=0.9)
    best = variant(report, tmp_path, "best", ttft_ms=500.0, accuracy=0.95)
    result = plan([report, fast, good, best], max_ttft_ms=100)
    assert result.chosen.name.startswith("good-") and result.chosen.accuracy == 0.9
    assert all(c.ttft_ms <= 100 for c in [result.chosen])
    names = {c.name.split("-")[0] for c in result.front}
    assert {"fast", "good", "best"} <= names  # each is best at its own speed
    unlimited = plan([report, fast, good, best])
    assert unlimited.chosen.name.startswith("best-")


def test_pareto_drops_dominated_points():
    def c(name, acc, ttft, mem):
        return Candidate(name, "r", "", "export", acc, ttft, mem, 1.0, "llava", 9, 4)

    points = [c("a", 0.9, 10, 100), c("b", 0.8, 20, 100), c("c", 0.95, 30, 100),
              c("d", 0.9, 10, 200)]
    assert [p.name for p in pareto(points)] == ["c", "a"]  # b slower and worse; d larger


def test_a_budget_no_point_meets_names_the_closest(report, tmp_path):
    with pytest.raises(UserError, match=r"no measured point meets the budget \(TTFT <= "
                                        r"0.001 ms\); the closest: .*% over"):
        plan([report], max_ttft_ms=0.001)


def test_reports_of_different_eval_sets_are_refused(report, tmp_path):
    d = json.loads(report.read_text())
    d["n_samples"] = 300
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    with pytest.raises(UserError, match="was measured on another eval set"):
        plan([report, other])


def test_the_cli_writes_the_plan(report, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgevlm.cli", "plan", "--reports", report,
                        "--max-ttft-ms", "100000", "--out", tmp_path / "p"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert written["chosen"]["name"] in ("fp32", "int4")
    r = subprocess.run([sys.executable, "-m", "edgevlm.cli", "plan", "--reports", report,
                        "--max-ttft-ms", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == \
        "error: --max-ttft-ms -1.0 must be a positive number", r.stderr
