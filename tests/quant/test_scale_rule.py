"""--scale-rule signed (llama.cpp's Q4_0 rule): each group's largest-magnitude weight is exact,
the step is finer than absmax's, the reconstruction error lower; checkpoints with its (possibly
negative) scales load with a plain from_pretrained and export to int4 through parity."""

from __future__ import annotations

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.primitives import choose_qparams, fake_quantize


def test_signed_rule_puts_the_extreme_weight_on_the_grid_and_errs_less():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    errors = {}
    for signed in (False, True):
        qp = choose_qparams(w, 4, 32, True, signed=signed)
        errors[signed] = float((fake_quantize(w, qp) - w).pow(2).mean())
    groups = w.reshape(256, 16, 32)
    ext = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))  # signed extreme per group
    deq = fake_quantize(w, choose_qparams(w, 4, 32, True, signed=True)).reshape(256, 16, 32)
    assert torch.allclose(deq.gather(-1, groups.abs().argmax(-1, keepdim=True)), ext, atol=1e-6)
    assert errors[True] < 0.9 * errors[False], errors  # finer step: measured 0.78x here


def test_the_default_rule_is_signed_where_it_applies_and_absmax_elsewhere():
    assert QuantConfig().scale_rule == "signed"  # symmetric W4: llama.cpp's Q4_0 rule
    assert QuantConfig(bits=2).scale_rule == "signed"
    assert QuantConfig(bits=8).scale_rule == "absmax"  # the int8 export's rule
    assert QuantConfig(symmetric=False).scale_rule == "absmax"  # zero points: min/max
    assert QuantConfig(scale_rule="absmax").scale_rule == "absmax"
    assert QuantConfig().to_dict()["scale_rule"] == "signed"  # the report names the rule used


def test_signed_rule_needs_symmetric_low_bit_weights():
    with pytest.raises(UserError, match="scale_rule='signed' is not valid; the signed rule"):
        QuantConfig(scale_rule="signed", bits=8)
    with pytest.raises(UserError, match="scale_rule='signed' is not valid"):
        QuantConfig(scale_rule="signed", symmetric=False)
    with pytest.raises(UserError, match="use one of absmax, signed"):
        QuantConfig(scale_rule="q4k")


@pytest.mark.slow
def test_signed_checkpoint_loads_plainly_and_exports(micro_model_dir, shapes_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model

    out = tmp_path / "q"
    quantize(micro_model_dir, out, QuantConfig(method="gptq", group_size=32, calib_samples=4,
                                               batch_size=4, scale_rule="signed"),
             calib=shapes_dir / "train.json")
    plain = LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():  # a plain load decompresses on the first forward pass
        plain(input_ids=torch.tensor([[1, 2, 3]]))
    ours = load_model(out, dequantize=True).model
    name = "model.language_model.layers.0.mlp.down_proj"
    assert torch.equal(plain.get_submodule(name).weight, ours.get_submodule(name).weight)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        scales = f.get_tensor(next(k for k in f.keys() if k.endswith("down_proj.weight_scale")))
    assert (scales < 0).any() and (scales > 0).any()  # the sign follows each group's extreme
    assert export(out, tmp_path / "e", ExportConfig(precision="int4")).parity.passed
