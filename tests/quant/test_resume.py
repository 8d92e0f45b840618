"""`quantize --resume`: a run killed after a block and resumed writes the very checkpoint an
uninterrupted run writes (every integer, scale and zero point, every stored tensor); a saved run
of other options or data is refused by name; a stale one is cleared; OUT done, nothing is left."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, QvlmConfig, quantize, workdir

FAST_QVLM = QvlmConfig(clip_grid=(1.0, 0.9), clip_strengths=(0.0, 1.0), vision_opt_steps=2)
FAST = dict(group_size=32, calib_samples=4, batch_size=4, qvlm=FAST_QVLM)
# two blocks of one decoder layer each (Q-VLM's max_block 1), so a kill can fall between them
RUNS = {"gptq": dict(method="gptq"),
        "qvlm": dict(method="qvlm", qvlm=replace(FAST_QVLM, max_block=1)),
        "gptq-a4": dict(method="gptq", act_bits=4, act_clip_grid=(1.0, 0.8))}


class Killed(Exception):
    """Stands for SIGKILL right after a block's state reached the disk."""


def kill_after(monkeypatch, k: int) -> None:
    real = workdir.save_block

    def save(out_dir, i, block):
        real(out_dir, i, block)
        if i == k:
            raise Killed

    monkeypatch.setattr(workdir, "save_block", save)


def stored(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out_dir.glob("*.safetensors")) for k, v in
            load_file(str(f)).items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_resumed_run_is_bit_identical(micro_model_dir, shapes_dir, tmp_path, monkeypatch, name):
    data = shapes_dir / "train.json"
    cfg = QuantConfig(**{**FAST, **RUNS[name]})
    ref = quantize(micro_model_dir, tmp_path / "ref", cfg, calib=data)
    assert ref.blocks == [[0], [1]] and ref.report["resumed_blocks"] == 0

    out = tmp_path / "q"
    with monkeypatch.context() as m:
        kill_after(m, 0)
        with pytest.raises(Killed):
            quantize(micro_model_dir, out, cfg, calib=data)
    work = tmp_path / ".q.work" / "quantize"
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == ["block_0000.pt", "run.json"]
    saved = workdir.load_blocks(out, ref.blocks)
    assert len(saved) == 1 and len(saved[0].weights) == 7  # layer 0's seven Linears

    r = quantize(micro_model_dir, out, cfg, calib=data, resume=True)
    assert r.report["resumed_blocks"] == 1
    assert not (tmp_path / ".q.work").exists()
    assert set(r.weights) == set(ref.weights) and len(ref.weights) == 14
    for n, qw in ref.weights.items():
        assert torch.equal(r.weights[n].q, qw.q), n
        assert torch.equal(r.weights[n].scale, qw.scale), n
        assert torch.equal(r.weights[n].zero_point, qw.zero_point), n
    a, b = stored(ref.out_dir), stored(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def timeless(records):
        return {n: {k: v for k, v in rec.items() if k != "seconds"} for n, rec in records.items()}

    # block 0's records come back too, with the time they took in the killed run
    assert timeless(r.report["layers"]) == timeless(ref.report["layers"])
    assert r.report.get("gptq_guard") == ref.report.get("gptq_guard")
    assert r.report.get("activations") == ref.report.get("activations")


@pytest.mark.slow
def test_resume_refuses_other_runs_and_clears_stale_ones(micro_model_dir, shapes_dir, tmp_path,
                                                         monkeypatch):
    data = tmp_path / "calib.json"
    entries = json.loads((shapes_dir / "train.json").read_text())
    data.write_text(json.dumps(entries))
    cfg = QuantConfig(method="gptq", **FAST)
    out = tmp_path / "q"
    kw = dict(calib=data, image_root=shapes_dir)
    with monkeypatch.context() as m:
        kill_after(m, 0)
        with pytest.raises(Killed):
            quantize(micro_model_dir, out, cfg, **kw)

    with pytest.raises(UserError, match=r"differs in bits \(saved 4, now 3\); resume with the "
                                        r"same options, or drop --resume"):
        quantize(micro_model_dir, out, QuantConfig(method="gptq", bits=3, **FAST), resume=True,
                 **kw)
    data.write_text(json.dumps(entries[::-1]))  # same file, other samples
    with pytest.raises(UserError, match="calibration differs .*digest"):
        quantize(micro_model_dir, out, cfg, resume=True, **kw)
    assert (tmp_path / ".q.work" / "quantize" / "block_0000.pt").is_file()  # still there

    r = quantize(micro_model_dir, out, cfg, **kw)  # no --resume: the saved run is discarded
    assert r.report["resumed_blocks"] == 0 and not (tmp_path / ".q.work").exists()
    with pytest.raises(UserError, match="nothing saved .* run without --resume"):
        quantize(micro_model_dir, tmp_path / "other", cfg, resume=True, **kw)


def test_cli_resume(micro_model_dir, shapes_dir, tmp_path, monkeypatch):
    """Killed after layer 0, resumed: stderr (not a terminal here) says what happens, in lines."""
    from edgevlm.cli import app

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # rich: "a terminal"
        monkeypatch.delenv(name, raising=False)
    args = ["quantize", str(micro_model_dir), "--out", str(tmp_path / "q"), "--method", "gptq",
            "--group-size", "32", "--calib", str(shapes_dir / "train.json"),
            "--calib-samples", "4"]
    runner = CliRunner()
    with monkeypatch.context() as m:
        kill_after(m, 0)
        r = runner.invoke(app, args)
    assert isinstance(r.exception, Killed)
    assert r.stderr.startswith(f"loading model {micro_model_dir} ...\n"
                               "calibration: a float pass over 1 batch(es) ...\n")
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert (f"resuming: 1 of 2 blocks quantized before, from {tmp_path / '.q.work' / 'quantize'}"
            in r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("quantize gptq: ")]
    assert len(lines) == 1 and lines[0].startswith("quantize gptq: 2/2 layers (100%) ")
    assert re.search(r"resumed blocks\W+1\b", r.stdout)
    other = [str(tmp_path / "q2") if a == str(tmp_path / "q") else a for a in args]
    again = runner.invoke(app, other + ["--resume"])
    assert isinstance(again.exception, UserError) and "nothing saved" in str(again.exception)
