"""Bench fixtures: the micro model exported to fp32 once, and a real bench report of it on two
shapes questions (the harness runs the export in its worker process, as `edgevlm bench` does)."""

from __future__ import annotations

import pytest

# The smallest settings that still time every span: one warmup-free answer per sample.
FAST = {"limit": 2, "warmup": 0, "repeats": 1, "max_new_tokens": 2, "provider": "cpu",
        "threads": 1, "timing_samples": 1}


@pytest.fixture(scope="session")
def export_dir(micro_model_dir, tmp_path_factory):
    from edgevlm.export import ExportConfig, export

    out = tmp_path_factory.mktemp("bench_export") / "fp32"
    export(micro_model_dir, out, ExportConfig(precision="fp32", validate=False))
    return out


@pytest.fixture(scope="session")
def bench_json(export_dir, shapes_dir, tmp_path_factory):
    """bench.json of the export on the first two shapes eval questions."""
    from edgevlm.bench.harness import BenchConfig, bench
    from edgevlm.bench.report import write_report

    out = tmp_path_factory.mktemp("bench_report") / "report"
    write_report(bench([export_dir], shapes_dir / "eval.json", BenchConfig(**FAST)), out)
    return out / "bench.json"
