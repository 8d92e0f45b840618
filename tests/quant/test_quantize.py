"""quantize() end to end on a micro LLaVA: transformers loads every output and its weights equal
ours exactly; Q-VLM's block search never does worse than GPTQ on its block; bad input is named."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, QvlmConfig, quantize
from edgevlm.quant.calib_data import TEXT_WINDOW, calibration_batches
from edgevlm.quant.checkpoint import REPORT, read_int4_layers
from edgevlm.quant.qvlm import partition

FAST_QVLM = QvlmConfig(clip_grid=(1.0, 0.9), clip_strengths=(0.0, 1.0), vision_opt_steps=2)
FAST = dict(group_size=32, calib_samples=4, batch_size=4, qvlm=FAST_QVLM)


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
    # gptq, qvlm: symmetric (default)
    runs = {"rtn": dict(method="rtn", symmetric=False), "gptq": dict(method="gptq"),
            "qvlm": dict(method="qvlm", qvlm=replace(FAST_QVLM, vision_opt=True))}
    return {name: quantize(micro_model_dir, out / name, QuantConfig(**{**FAST, **kw}),
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
    assert rep["vision_opt"]["steps"] == 2  # asked for: off by default
    assert QuantConfig().qvlm.vision_opt is False
    guard = rep["gptq_guard"]
    if guard["kept"] == "qvlm":
        search = rep["block_search"][0]
        # β = 0 is GPTQ inside the block, so the chosen β is at least as good on held-out data.
        assert search["block_error"] <= search["candidate_errors"]["0.0"]
    else:  # the whole model judged: GPTQ's integers answered the held-out batches closer
        assert guard["gptq_heldout_kl"] < guard["qvlm_heldout_kl"]
        assert rep["block_search"][0]["beta"] == 0.0
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
    with pytest.raises(UserError, match="no longer offers NF4.*BitsAndBytesConfig"):
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


def test_vision_opt_keeps_the_checkpoint_heldout_data_confirms(micro_model_dir, shapes_dir,
                                                                monkeypatch):
    from edgevlm.models import load_model
    from edgevlm.quant import qvlm, rtn

    # An entropy weight this large pulls the visual tokens far from what the decoder expects:
    # the held-out KL must catch it, and the step keeps only what lowered that KL.
    monkeypatch.setattr(qvlm, "ENTROPY_WEIGHT", 1e4)
    loaded = load_model(micro_model_dir)
    model = loaded.model
    cfg = QuantConfig(method="qvlm", **{**FAST, "calib_samples": 8,
                                        "qvlm": replace(FAST_QVLM, vision_opt_steps=8)})
    read = calibration_batches(loaded, shapes_dir / "train.json", cfg, None)
    assert read.heldout == 1 and read.report["heldout_samples"] == 2
    assert [b["input_ids"].shape[0] for b in read.batches] == [4, 2, 2]
    ref = qvlm.vision_reference(model, read.batches, read.heldout)  # the float model's answers
    assert (len(ref.fit), len(ref.held)) == (2, 1)
    # the step runs on the quantized model as it will ship: here, the decoder rounded
    with torch.no_grad():
        for m in model.model.language_model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = rtn.quantize_weight(m.weight.float(), cfg).dequantize()
    decoder = {n: p.clone() for n, p in model.model.language_model.named_parameters()}
    start = {n: p.clone() for n, p in model.model.multi_modal_projector.named_parameters()}
    rep = qvlm.optimize_vision(model, ref, cfg)
    assert rep["objective"].startswith("KL(fp || the quantized model)")
    cands = rep["heldout_kl_candidates"]
    assert len(cands) == len(qvlm.VISION_LRS) * 3  # checkpoints at steps 2, 4 and 8
    assert rep["heldout_kl_after"] == min(rep["heldout_kl_before"], *cands.values())
    assert rep["heldout_kl_before"] > 0  # the rounded decoder does move the answers
    assert max(cands.values()) > rep["heldout_kl_before"]  # the pull did cost somewhere
    # the quantized decoder is untouched; the kept vision parameters give the reported KL
    for n, p in model.model.language_model.named_parameters():
        assert torch.equal(p, decoder[n]), n
    moved = any(not torch.equal(p, start[n])
                for n, p in model.model.multi_modal_projector.named_parameters())
    assert moved == (rep["steps_kept"] > 0)
    with torch.no_grad():
        ref_model = load_model(micro_model_dir).model
        held = read.batches[-1]
        kl = float(qvlm._kl(model, held, qvlm._answer_logp(ref_model, held, {}), {}))
    assert kl == pytest.approx(rep["heldout_kl_after"], rel=1e-4, abs=1e-7)
    with pytest.raises(UserError, match="held-out calibration batches"):
        qvlm.vision_reference(model, read.batches[:1], 0)


def test_qvlm_needs_samples_to_hold_out(micro_model_dir, shapes_dir, tmp_path):
    rows = json.loads((shapes_dir / "train.json").read_text())[:1]
    (tmp_path / "one.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="holds 1 sample.*holds out at least one"):
        quantize(micro_model_dir, tmp_path / "out", QuantConfig(method="qvlm", **FAST),
                 calib=tmp_path / "one.json", image_root=shapes_dir)
    assert not (tmp_path / "out").exists()


def test_calibration_leaves_out_text_only_entries(micro_model_dir, shapes_dir, tmp_path):
    """LLaVA-665k's text-only conversations in --calib (images found through --image-root):
    calibration, which measures image + text activations, uses the image entries only."""
    from edgevlm.models import load_model

    rows = json.loads((shapes_dir / "train.json").read_text())[:9]
    for row in rows[:3]:
        del row["image"]
        row["conversations"][0]["value"] = row["conversations"][0]["value"].replace(
            "<image>\n", "")
    (tmp_path / "mix.json").write_text(json.dumps(rows))
    cfg = QuantConfig(method="gptq", **{**FAST, "calib_samples": 8})
    read = calibration_batches(load_model(micro_model_dir), tmp_path / "mix.json", cfg,
                                    shapes_dir)
    assert read.report["text_only_left_out"] == 3
    assert (read.report["truncated"], read.report["skipped_too_long"]) == (0, 0)
    assert sum(b["pixel_values"].shape[0] for b in read.batches) == 6
    assert sum(b["input_ids"].shape[0] for b in read.batches) == 6
    with pytest.raises(UserError, match="--image-root"):
        calibration_batches(load_model(micro_model_dir), tmp_path / "mix.json", cfg, None)


@pytest.mark.parametrize("method", ["gptq", "qvlm"])
def test_bf16_weights_quantize_like_float32(micro_model_dir, shapes_dir, tmp_path, method):
    """The device- and dtype-handling lines on the CPU: bf16 weights go through calibration,
    the block walk (device "cpu") and the searches, the arithmetic in float32/float64, and land
    within reach of the float32 run."""
    cfg = QuantConfig(method=method, **FAST)
    runs = {dt: quantize(micro_model_dir, tmp_path / str(dt), cfg, calib=shapes_dir / "train.json",
                         device="cpu", dtype=dt)
            for dt in (torch.float32, torch.bfloat16)}
    half, full = runs[torch.bfloat16], runs[torch.float32]
    assert (half.report["dtype"], half.report["device"]) == ("bfloat16", "cpu")
    assert half.weights.keys() == full.weights.keys()
    for name, qw in half.weights.items():
        assert qw.q.device.type == "cpu" and qw.scale.dtype == torch.float32
        agree = (qw.q == full.weights[name].q).float().mean()
        assert agree > 0.7, (name, float(agree))  # bf16 inputs move some roundings, not most
    assert half.mean_error < 1.5 * full.mean_error + 1e-3
    model = load_hf(half.out_dir, symmetric=True)
    assert model.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="names the missing GPU")
def test_device_cuda_without_a_gpu_is_named(micro_model_dir, tmp_path):
    with pytest.raises(UserError, match="--device cuda, but torch .* sees no CUDA device"):
        quantize(micro_model_dir, tmp_path / "out", QuantConfig(method="rtn"), device="cuda")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--device 'gpu': use one of auto, cpu, cuda"):
        quantize(micro_model_dir, tmp_path / "out", QuantConfig(method="rtn"), device="gpu")


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("prose") / "text.txt"
    path.write_text("\n".join(topics[k] for k in sorted(topics))[:200_000])
    return path


@pytest.mark.slow
def test_text_calibration_alone_and_beside_images(micro_model_dir, shapes_dir, prose, tmp_path):
    """--calib-text: plain-text windows calibrate the language model, alone or with images."""
    from edgevlm.models import load_model

    cfg = QuantConfig(method="gptq", **{**FAST, "calib_samples": 6})
    loaded = load_model(micro_model_dir)
    text = calibration_batches(loaded, None, cfg, None, prose)
    assert [b["input_ids"].shape for b in text.batches] == [(4, TEXT_WINDOW),
                                                             (2, TEXT_WINDOW)]
    assert all(b["pixel_values"] is None for b in text.batches) and text.heldout == 0
    assert text.report["text_windows"] == 6
    mixed = calibration_batches(loaded, shapes_dir / "train.json",
                                     QuantConfig(method="qvlm", **{**FAST, "calib_samples": 6}),
                                     None, prose)
    kinds = ["image" if b["pixel_values"] is not None else "text" for b in mixed.batches]
    assert kinds == ["image", "text", "text", "image"] and mixed.heldout == 1  # images held out

    runs = {name: quantize(micro_model_dir, tmp_path / name, QuantConfig(method=m, **{
        **FAST, "calib_samples": 6, "qvlm": replace(FAST_QVLM, vision_opt=m == "qvlm")}),
        calib_text=prose)
        for name, m in (("gptq", "gptq"), ("qvlm", "qvlm"), ("rtn", "rtn"))}
    rep = runs["qvlm"].report
    assert rep["vision_opt"].startswith("skipped: no image calibration")
    assert rep["calibration"]["heldout_text_windows"] == 2  # Q-VLM holds out text windows
    assert runs["gptq"].report["calibration"]["text_windows"] == 6
    # the Hessians came from the text: GPTQ's integers are not round-to-nearest's
    name = "model.language_model.layers.0.mlp.down_proj"
    changed = (runs["gptq"].weights[name].q != runs["rtn"].weights[name].q).float().mean()
    assert changed > 0.05
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(UserError, match="less than one calibration window of 512"):
        quantize(micro_model_dir, tmp_path / "s", QuantConfig(method="gptq", **FAST),
                 calib_text=short)
    assert not (tmp_path / "s").exists()


def gptq_on_the_same_batches(model_dir, data, cfg: QuantConfig) -> dict:
    """GPTQ's integers, walked layer by layer over the calibration batches Q-VLM builds for `cfg`
    (its fitting batches, then its held-out ones). Exactness is a property of identical inputs:
    `quantize(method="gptq")` batches the same samples without a held-out split, so its padding
    and summation order differ and its Hessians agree with Q-VLM's only to float rounding
    (about 1e-6 here), which may flip a rounding decision."""
    from edgevlm.models import load_model
    from edgevlm.quant.blocks import layerwise_block
    from edgevlm.quant.calibrate import decoder_layers, prepare, walk

    loaded = load_model(model_dir, dtype=torch.float32)
    read = calibration_batches(loaded, data, cfg, None)
    with torch.no_grad():
        calib = prepare(loaded.model, read.batches, read.heldout)
    weights: dict = {}
    gptq_cfg = replace(cfg, method="gptq")
    walk(loaded.model, calib, [[i] for i in range(len(decoder_layers(loaded.model)))],
         layerwise_block(loaded.model, gptq_cfg, weights))
    return weights


def test_qvlm_at_beta_zero_is_gptq_exactly(micro_model_dir, shapes_dir, tmp_path):
    """The fact the GPTQ guard rests on: on the same calibration batches, Q-VLM restricted to
    beta 0 writes GPTQ's integers. Exact by construction: clip = 1 - 0·(1 - alpha) is 1.0 in
    every group, and each Linear's Hessian is accumulated from the same inputs in the same
    order, so gptq.quantize_weight sees bit-equal arguments."""
    data = shapes_dir / "train.json"
    cfg = QuantConfig(method="qvlm", bits=3, group_size=32, calib_samples=16,
                      qvlm=QvlmConfig(clip_strengths=(0.0,)))
    q = quantize(micro_model_dir, tmp_path / "q", cfg, calib=data)
    g = gptq_on_the_same_batches(micro_model_dir, data, cfg)
    assert set(q.weights) == set(g) and len(g) == 14
    assert all(torch.equal(q.weights[n].q, g[n].q) for n in g)
    assert all(torch.equal(q.weights[n].scale, g[n].scale) for n in g)
    assert q.report["gptq_guard"]["kept"] == "qvlm"  # nothing to compare: beta 0 everywhere


@pytest.mark.slow
@pytest.mark.parametrize("clip_grid", [(0.3,), (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)],
                         ids=["forced-bad-clip", "default-grid"])
def test_gptq_guard_keeps_the_lower_heldout_kl(micro_model_dir, shapes_dir, tmp_path,
                                               clip_grid):
    """Q-VLM is never below GPTQ on its own held-out batches: with a clip search forced to clip
    every group to 30% of its range the guard falls back to GPTQ's integers exactly; with the
    default grid it keeps whichever KL is lower."""
    data = shapes_dir / "train.json"
    q_cfg = QuantConfig(method="qvlm", bits=3, group_size=32, calib_samples=16,
                        qvlm=QvlmConfig(clip_strengths=(1.0,), clip_grid=clip_grid))
    q = quantize(micro_model_dir, tmp_path / "q", q_cfg, calib=data)
    guard = q.report["gptq_guard"]
    kept = "gptq" if guard["gptq_heldout_kl"] < guard["qvlm_heldout_kl"] else "qvlm"
    assert guard["kept"] == kept
    if clip_grid == (0.3,):
        assert kept == "gptq" and guard["gptq_heldout_kl"] < guard["qvlm_heldout_kl"]
        g = gptq_on_the_same_batches(micro_model_dir, data, replace(q_cfg, qvlm=replace(
            q_cfg.qvlm, clip_strengths=(0.0,))))  # the guard's GPTQ pass: beta 0, same batches
        assert all(torch.equal(q.weights[n].q, g[n].q) for n in g)
    from edgevlm.models import load_model

    back = dict(load_model(tmp_path / "q", dequantize=True).model.named_modules())
    for name, w in q.weights.items():
        assert torch.equal(back[name].weight, w.dequantize())
