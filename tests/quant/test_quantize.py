"""quantize() end to end on a micro LLaVA: transformers loads every output and its weights equal
ours exactly; Q-VLM's block search never does worse than GPTQ on its block; bad input is named."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.checkpoint import REPORT, read_int4_layers
from edgevlm.quant.qvlm import partition

FAST = dict(group_size=32, calib_samples=4, batch_size=4, clip_grid=(1.0, 0.9),
            clip_strengths=(0.0, 1.0), vision_opt_steps=2)


def load_hf(path, symmetric):
    from transformers import CompressedTensorsConfig, LlavaForConditionalGeneration

    # Asymmetric pack-quantized checkpoints hit an upstream loader bug (llm-compressor #1618):
    # the dequantize-on-load route is the one that reads their packed zero points.
    kw = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = LlavaForConditionalGeneration.from_pretrained(str(path), **kw)
    if symmetric:  # plain from_pretrained; the modules decompress on the first forward pass
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    return model


@pytest.fixture(scope="module")
def results(micro_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant")
    runs = {"rtn": dict(method="rtn", symmetric=False), "gptq": dict(method="gptq"),
            "qvlm": dict(method="qvlm")}  # gptq and qvlm: the default, symmetric
    return {name: quantize(micro_model_dir, out / name, QuantConfig(**kw, **FAST),
                           calib=shapes_dir / "train.json")
            for name, kw in runs.items()}


@pytest.mark.parametrize("name", ["rtn", "gptq", "qvlm"])
def test_transformers_loads_exactly_our_weights(results, name):
    r = results[name]
    sym = r.report["symmetric"]
    assert sym == (name != "rtn")  # symmetric unless asked otherwise: a plain load opens it
    model = load_hf(r.out_dir, sym)
    modules = dict(model.named_modules())
    assert r.layers_quantized == 14 and len(r.weights) == 14  # 2 layers x 7 Linears
    for layer, qw in r.weights.items():
        assert torch.equal(modules[layer].weight.data, qw.dequantize()), layer
    ints = read_int4_layers(r.out_dir)
    assert set(ints) == set(r.weights)
    for layer, (q, scale, zp, gs) in ints.items():
        assert gs == 32 and torch.equal(torch.from_numpy(q).int(), r.weights[layer].q)
        assert torch.equal(torch.from_numpy(zp).int(), r.weights[layer].zero_point)
        assert torch.equal(torch.from_numpy(scale), r.weights[layer].scale)
    # Skipped modules keep their float weights.
    assert "lm_head" in r.report["skipped"]
    assert hasattr(modules["lm_head"], "weight")


def test_report_records_entropy_errors_and_blocks(results):
    rep = json.loads((results["qvlm"].out_dir / REPORT).read_text())
    assert rep["method"] == "qvlm" and rep["bits"] == 4 and rep["group_size"] == 32
    assert len(rep["calibration"]["layer_input_entropy"]) == 2
    assert rep["blocks"] == [[0, 1]]  # max_block 4 holds both layers
    assert all(0 < v["entropy"] <= 8 and 0 < v["error"] < 0.5 for v in rep["layers"].values())
    assert rep["vision_opt"]["steps"] == 2
    search = rep["block_search"][0]
    # β = 0 is GPTQ inside the block, so the chosen β is at least as good on calibration data.
    assert search["block_error"] <= search["candidate_errors"]["0.0"]
    assert results["gptq"].mean_error < results["rtn"].mean_error


def test_partition_cuts_at_low_entropy():
    assert partition([5.0, 4.0, 1.0, 6.0, 7.0, 2.0, 8.0], 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert partition([1.0] * 4, 1) == [[0], [1], [2], [3]]
    assert partition([3.0, 2.0], 4) == [[0, 1]]


def test_bad_inputs_are_named(micro_model_dir, shapes_dir, results, tmp_path):
    calib = shapes_dir / "train.json"
    cfg = QuantConfig(method="gptq", **FAST)
    with pytest.raises(UserError, match="already exists"):
        quantize(micro_model_dir, results["rtn"].out_dir, cfg, calib=calib)
    with pytest.raises(UserError, match="already quantized"):
        quantize(results["rtn"].out_dir, tmp_path / "a", cfg, calib=calib)
    with pytest.raises(UserError, match=r"--group-size 128 is larger than the input width 64 of "
                                        r"model\.language.*--group-size -1"):
        quantize(micro_model_dir, tmp_path / "b", QuantConfig(method="rtn"), calib=calib)
    rows = json.loads(calib.read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps(rows[:1]))
    with pytest.raises(UserError, match="at least 2"):
        quantize(micro_model_dir, tmp_path / "c", cfg, calib=one, image_root=shapes_dir)
    no_img = tmp_path / "noimg.json"
    no_img.write_text(json.dumps([{k: v for k, v in r.items() if k != "image"} for r in rows]))
    with pytest.raises(UserError, match="no 'image'"):
        quantize(micro_model_dir, tmp_path / "d", cfg, calib=no_img)
    with pytest.raises(UserError, match="needs calibration data"):
        quantize(micro_model_dir, tmp_path / "e", cfg)
    with pytest.raises(UserError, match="CUDA GPU and `pip install bitsandbytes`"):
        quantize(micro_model_dir, tmp_path / "f", QuantConfig(method="nf4"))
    assert not any(tmp_path.glob("[a-f]"))


def test_nan_stops_with_layer_name_and_leaves_no_out(micro_model_dir, shapes_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(micro_model_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = next(k for k in sd if "layers.1.mlp.up_proj.weight" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"NaN or inf .*layers\.1\.mlp\.up_proj"):
        quantize(bad, tmp_path / "out", QuantConfig(method="gptq", **FAST),
                 calib=shapes_dir / "train.json")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_vision_opt_stays_inside_its_kl_budget(micro_model_dir, shapes_dir, monkeypatch):
    from edgevlm.models import load_model
    from edgevlm.quant import api, qvlm

    # An entropy weight this large would move the answers far within a few Adam steps: the
    # trust region must undo the step that leaves the budget and stop there.
    monkeypatch.setattr(qvlm, "ENTROPY_WEIGHT", 1e4)
    loaded = load_model(micro_model_dir)
    cfg = QuantConfig(method="qvlm", **{**FAST, "vision_opt_steps": 30})
    batches = api._calibration_batches(loaded, shapes_dir / "train.json", cfg, None).batches
    rep = qvlm.optimize_vision(loaded.model, batches, cfg)
    assert rep["final_kl"] <= rep["kl_budget"] == qvlm.KL_BUDGET
    assert rep["steps_kept"] < 30


def test_calibration_leaves_out_text_only_entries(micro_model_dir, shapes_dir, tmp_path):
    """LLaVA-665k's text-only conversations in --calib (images found through --image-root):
    calibration, which measures image + text activations, uses the image entries only."""
    from edgevlm.models import load_model
    from edgevlm.quant import api

    rows = json.loads((shapes_dir / "train.json").read_text())[:9]
    for row in rows[:3]:
        del row["image"]
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace(
            "<image>\n", "")
    (tmp_path / "mix.json").write_text(json.dumps(rows))
    cfg = QuantConfig(method="gptq", **{**FAST, "calib_samples": 8})
    read = api._calibration_batches(load_model(micro_model_dir), tmp_path / "mix.json", cfg,
                                    shapes_dir)
    assert read.report["text_only_left_out"] == 3
    assert (read.report["truncated"], read.report["skipped_too_long"]) == (0, 0)
    assert sum(b["pixel_values"].shape[0] for b in read.batches) == 6
    assert sum(b["input_ids"].shape[0] for b in read.batches) == 6
    with pytest.raises(UserError, match="--image-root"):
        api._calibration_batches(load_model(micro_model_dir), tmp_path / "mix.json", cfg, None)
