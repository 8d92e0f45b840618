"""`edgevlm demo`: a --quick run's bench report says, on every rendering, that its accuracies
are a smoke test. (No test runs the whole demo: its stages are each tested where they live.)"""

from __future__ import annotations

from edgevlm.bench.report import BenchReport, load_report
from edgevlm.cli.demo import DemoConfig, write_bench


def test_a_quick_demo_report_says_smoke_test(tmp_path):
    report = BenchReport("", "data/eval.json", 20, {}, {}, [], [])
    write_bench(report, tmp_path / "quick", DemoConfig.make(quick=True))
    write_bench(report, tmp_path / "full", DemoConfig.make(quick=False))
    md = (tmp_path / "quick" / "bench.md").read_text()
    assert "smoke test (--quick)" in md and "accuracies mean nothing" in md
    assert load_report(tmp_path / "quick").note == DemoConfig.make(quick=True).note
    assert (tmp_path / "quick" / "bench.png").is_file()
    assert "smoke test" not in (tmp_path / "full" / "bench.md").read_text()
    assert load_report(tmp_path / "full").note == ""
