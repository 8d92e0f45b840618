"""Activation quantization: per-token quantizers stay in their integer range, the clipping search
lowers the output error where clipping pays, and a W8A8 / W4A4 checkpoint of the micro model is
evaluated with exactly those quantizers on its Linear inputs."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, QvlmConfig, quantize
from edgevlm.quant.act import best_clip, clip_errors, fake_quantize_tokens, load_for_eval
from edgevlm.quant.checkpoint import REPORT
from edgevlm.quant.primitives import choose_qparams
from edgevlm.quant.qvlm import blocks, uniform

FAST = dict(calib_samples=4, batch_size=4, qvlm=QvlmConfig(
    clip_grid=(1.0, 0.9), clip_strengths=(0.0, 1.0), vision_opt_steps=2))
GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("clip", [1.0, 0.7])
def test_token_quantizer_stays_in_its_integer_range(bits, clip):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * torch.linspace(0.1, 10, 5).reshape(1, 5, 1)  # (B, S, K)
    out = fake_quantize_tokens(x, bits, clip)
    assert out.shape == x.shape and out.dtype == x.dtype
    rows, qrows = x.reshape(-1, 64), out.reshape(-1, 64)
    qp = choose_qparams(rows, bits, -1, False, clip)  # one (scale, zero point) per token
    codes = qrows / qp.scale + qp.zero_point  # (T, K) integers in [0, 2^bits − 1]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2 ** bits - 1
    assert all(len(r.unique()) <= 2 ** bits for r in qrows)
    # The range shrinks with the clip and each token keeps its own scale (rows differ 100x).
    assert (qrows.abs().amax(-1) <= clip * rows.abs().amax(-1) + qp.scale.squeeze(-1)).all()
    assert qp.scale[-1] / qp.scale[0] > 20
    lo, hi = rows.amin(-1, keepdim=True) * clip, rows.amax(-1, keepdim=True) * clip
    inside = (rows >= lo) & (rows <= hi)  # round to nearest inside the clipped range
    assert ((rows - qrows).abs()[inside] <= (qp.scale / 2 + 1e-6).expand_as(rows)[inside]).all()


def test_clip_search_lowers_error_at_4_bits_and_keeps_8_bits_unclipped():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((256, 256))  # heavy-tailed inputs
    W = torch.randn(64, 256) / 16
    errs4, ref = clip_errors(x, W, W, 4, GRID)
    rel4 = dict(zip(GRID, (errs4 / ref).sqrt().tolist()))
    assert best_clip(rel4) < 1.0
    assert rel4[best_clip(rel4)] < 0.97 * rel4[1.0]  # measured: 0.140 vs 0.150
    errs8, ref8 = clip_errors(x, W, W, 8, GRID)
    rel8 = dict(zip(GRID, (errs8 / ref8).sqrt().tolist()))
    assert best_clip(rel8) == 1.0 and rel8[1.0] < 0.02
    # The error is measured against the float weight: a coarser Ŵ adds to it.
    Wq = (W * 8).round() / 8
    assert float(clip_errors(x, W, Wq, 8, (1.0,))[0][0]) > float(errs8[0])


def test_uniform_partition_keeps_the_entropy_block_count():
    assert uniform(4, 2) == [[0, 1], [2, 3]]
    assert uniform(5, 2) == [[0, 1, 2], [3, 4]]
    ent = [5.0, 4.0, 1.0, 6.0, 7.0, 2.0, 8.0]
    assert blocks(ent, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert blocks(ent, 3, "uniform") == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(UserError, match="partition='size'.*entropy, uniform"):
        QuantConfig(qvlm=QvlmConfig(partition="size"))


def test_unsupported_activation_bits_are_named(micro_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"act_bits=5 .*16 \(weight-only\), 8 \(W8A8.*6 / 4"):
        QuantConfig(act_bits=5)
    with pytest.raises(UserError, match=r"--act-bits 4 \(its clipping search\) needs calibration"):
        quantize(micro_model_dir, tmp_path / "a", QuantConfig(method="rtn", group_size=32,
                                                              act_bits=4))
    assert not (tmp_path / "a").exists()


def _linear_io(model, name: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's input before and after every other pre-hook on it, in one forward pass."""
    seen = {}
    module = dict(model.named_modules())[name]
    first = module.register_forward_pre_hook(
        lambda m, a: seen.setdefault("raw", a[0].detach().clone()), prepend=True)
    last = module.register_forward_pre_hook(
        lambda m, a: seen.setdefault("used", a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        first.remove()
        last.remove()
    return seen["raw"], seen["used"]


@pytest.fixture(scope="module")
def batch(micro_model_dir, shapes_dir):
    from edgevlm.data import Collator, load_samples
    from edgevlm.models import load_model

    loaded = load_model(micro_model_dir)
    b = Collator(loaded.processor, loaded.num_image_tokens)(
        load_samples(shapes_dir / "eval.json")[:2])
    return {k: v for k, v in b.items() if k != "labels"}


@pytest.mark.slow
def test_w8a8_end_to_end_evaluates_quantized_activations(micro_model_dir, shapes_dir, tmp_path,
                                                         batch):
    out = tmp_path / "w8a8"
    r = quantize(micro_model_dir, out, QuantConfig(method="gptq", bits=8, group_size=-1,
                                                   symmetric=True, act_bits=8, **FAST),
                 calib=shapes_dir / "train.json")
    acts = json.loads((out / REPORT).read_text())["activations"]
    assert acts["bits"] == 8 and acts["mode"] == "deployable" and not acts["searched"]
    assert "onnxruntime" in acts["deployment"] and "--precision int8" in acts["deployment"]
    assert set(acts["clip"]) == set(r.weights) and len(acts["clip"]) == 14
    assert set(acts["clip"].values()) == {1.0}
    assert all(0 < r.report["layers"][n]["act_error"] < 0.05 for n in acts["clip"])

    loaded = load_for_eval(out)
    name = "model.language_model.layers.1.mlp.down_proj"
    raw, used = _linear_io(loaded.model, name, batch)
    assert torch.equal(used, fake_quantize_tokens(raw, 8, 1.0)) and not torch.equal(used, raw)
    raw_head, used_head = _linear_io(loaded.model, "lm_head", batch)
    assert torch.equal(raw_head, used_head)  # skipped layers keep float inputs
    # The weights are the checkpoint's int8 values, exactly.
    W = dict(loaded.model.named_modules())[name].weight.data
    assert torch.equal(W, r.weights[name].dequantize())


@pytest.mark.slow
def test_w4a4_searches_clipping_and_marks_research_mode(micro_model_dir, shapes_dir, tmp_path,
                                                        batch):
    out = tmp_path / "w4a4"
    grid = (1.0, 0.9, 0.8, 0.7)
    r = quantize(micro_model_dir, out, QuantConfig(method="rtn", group_size=32, act_bits=4,
                                                   act_clip_grid=grid, **FAST),
                 calib=shapes_dir / "train.json")
    acts = r.report["activations"]
    assert acts["searched"] and acts["mode"].startswith("simulated (research mode)")
    assert len(acts["clip"]) == 14 and set(acts["clip"].values()) <= set(grid)
    for n, errs in acts["relative_errors"].items():  # the chosen α has the least error
        assert errs[str(acts["clip"][n])] == min(errs.values())
    assert min(acts["clip"].values()) < 1.0  # real activations have tails that 4 bits clip
    name = "model.language_model.layers.0.self_attn.o_proj"
    raw, used = _linear_io(load_for_eval(out).model, name, batch)
    assert torch.equal(used, fake_quantize_tokens(raw, 4, acts["clip"][name]))
