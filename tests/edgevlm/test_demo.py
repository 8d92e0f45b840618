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


def test_a_full_demo_over_a_quick_one_is_refused(tmp_path):
    """It reused every quick stage ("done already") and showed the smoke test as the full
    result (issue 33); now it stops before writing anything, naming the settings it found."""
    import json
    from dataclasses import asdict

    import pytest

    from edgevlm.cli.demo import run_demo
    from edgevlm.errors import UserError

    out = tmp_path / "demo"
    out.mkdir()
    quick = asdict(DemoConfig.make(quick=True))
    (out / "demo_config.json").write_text(json.dumps(quick, indent=1))
    with pytest.raises(UserError, match=r"holds a demo run made with --quick settings; this run "
                                        "would reuse its stages"):
        run_demo(out, DemoConfig.make(quick=False))
    assert json.loads((out / "demo_config.json").read_text()) == json.loads(json.dumps(quick))
    assert sorted(p.name for p in out.iterdir()) == ["demo_config.json"]
    (out / "demo_config.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not an edgevlm demo run"):
        run_demo(out, DemoConfig.make(quick=True))
