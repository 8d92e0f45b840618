"""`edgevlm run`: streams the answer to stdout, timings table to stderr, clear errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.errors import UserError


def test_run_streams_answer_and_timings(export_dir, eval_samples, vlm):
    image = str(eval_samples[1].image)
    expected = vlm.generate(image, "What shape is it?", max_new_tokens=6).text
    result = CliRunner().invoke(app, ["run", str(export_dir), "--image", image, "--prompt",
                                      "What shape is it?", "--max-new-tokens", "6",
                                      "--provider", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected
    assert "time to first token" in result.stderr and "tokens/s" in result.stderr


def test_run_rejects_a_model_folder(model_dir):
    result = CliRunner().invoke(app, ["run", str(model_dir), "--prompt", "hi"])
    assert isinstance(result.exception, UserError)
    assert "edgevlm export" in str(result.exception)


@pytest.mark.parametrize("args, match", [(["--max-new-tokens", "0"], "max_new_tokens"),
                                          (["--provider", "tpu"], "tpu")])
def test_run_bad_options(export_dir, args, match):
    result = CliRunner().invoke(app, ["run", str(export_dir), "--prompt", "hi", *args])
    assert isinstance(result.exception, UserError) and match in str(result.exception)
