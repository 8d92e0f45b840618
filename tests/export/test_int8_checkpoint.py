"""int8 export of an 8-bit checkpoint (W8A8: GPTQ, per channel, symmetric): the MatMulInteger
weights hold exactly the checkpoint's integers and scales, where onnxruntime's own re-rounding
of the same dequantized weights would not, and the graphs match torch on those weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgevlm.errors import UserError
from edgevlm.export import ExportConfig, export
from edgevlm.export import precision as prec
from edgevlm.export.graphs import wrapper
from edgevlm.export.validate import RELATIVE_TOLERANCE
from edgevlm.models import load_model
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.checkpoint import read_int8_layers
from edgevlm.runtime import contract

DECODER = "decoder_model_merged"
W8A8 = dict(method="gptq", bits=8, group_size=-1, symmetric=True, act_bits=8, calib_samples=4,
            batch_size=4)


@pytest.fixture(scope="module")
def ckpt(micro_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "ckpt"
    quantize(micro_model_dir, out, QuantConfig(**W8A8), calib=shapes_dir / "train.json")
    return out


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    return export(ckpt, tmp_path_factory.mktemp("w8a8_onnx") / "out",
                  ExportConfig(precision="int8", new_tokens=16, decoder="traced"))


def _int8_layers(path) -> dict[str, tuple]:
    """{graph module name: (q (N, K) int8, scale (N,), zero point (N,))} of every MatMulInteger
    whose weight is an initializer."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            w = node.input[1].removesuffix("_quantized")
            assert node.input[3] == f"{w}_zero_point"
            out[w.removesuffix(".weight")] = (inits[node.input[1]].T, inits[f"{w}_scale"],
                                              inits[node.input[3]])
    return out


def _graph_names(ckpt) -> dict[str, str]:
    """{checkpoint module name: its name in the decoder graph}."""
    model = load_model(ckpt, dequantize=True).model
    hf = {id(m): n for n, m in model.named_modules()}
    return {hf[id(m)]: n for n, m in wrapper(DECODER, model).named_modules() if id(m) in hf}


def test_matmulinteger_holds_checkpoint_integers_exactly(ckpt, exported):
    layers = read_int8_layers(ckpt)
    graph = _int8_layers(exported.out_dir / exported.components[DECODER].file)
    names = _graph_names(ckpt)
    for hf_name, (q, scale, zp) in layers.items():
        gq, gs, gz = graph[names[hf_name]]
        # stored unsigned (the s8 value + 128; edgevlm.export.int8): the same integers
        assert gq.dtype == np.uint8 and gz.dtype == np.uint8 and gs.dtype == np.float32
        np.testing.assert_array_equal(gq.astype(np.int16) - 128, q, err_msg=hf_name)
        np.testing.assert_array_equal(gs, scale, err_msg=hf_name)
        np.testing.assert_array_equal(gz.astype(np.int16) - 128, np.zeros_like(zp),
                                      err_msg=hf_name)
    # Every decoder Linear the checkpoint quantized, and lm_head (float there, rounded here).
    assert len(layers) == 14 and set(graph) == {names[n] for n in layers} | {"lm_head"}
    manifest = json.loads((exported.out_dir / contract.MANIFEST).read_text())
    assert manifest["int8_source"] == "checkpoint" and manifest["int4_source"] is None


def test_parity_with_torch_on_the_checkpoint_weights(exported):
    # The reference is torch on the dequantized checkpoint; the graph differs from it only by
    # onnxruntime's dynamic uint8 activations (and lm_head, rounded to int8 here).
    parity = exported.parity
    assert parity.passed, parity.failures
    for err in parity.components.values():
        assert err.max_abs < RELATIVE_TOLERANCE["int8"] * err.reference_max_abs
    decoder = parity.components[DECODER]
    assert decoder.max_abs < 0.05 * decoder.reference_max_abs  # measured 1.5%
    assert parity.greedy.steps_compared >= 1
    assert parity.greedy.logits_max_abs < 0.05 * decoder.reference_max_abs


def test_plain_quantize_dynamic_would_change_the_integers(ckpt, tmp_path):
    """Not vacuous: onnxruntime's own int8 of the same dequantized weights differs, since its
    scale is max|w|/127 and GPTQ leaves some channels short of the ends of the range."""
    fp32 = export(ckpt, tmp_path / "fp32", ExportConfig(precision="fp32", validate=False,
                                                        decoder="traced"))
    plain = tmp_path / "plain.onnx"
    prec.quantize(DECODER, "int8", fp32.out_dir / fp32.components[DECODER].file, plain, 32, False)
    graph = _int8_layers(plain)
    names = _graph_names(ckpt)
    short = int_differ = 0
    for hf_name, (q, scale, _) in read_int8_layers(ckpt).items():
        gq, gs, _ = graph[names[hf_name]]
        assert not np.array_equal(gs, scale), hf_name
        int_differ += not np.array_equal(gq, q)
        short += int((np.abs(q.astype(np.int32)).max(axis=1) < 127).sum())
    assert int_differ > 0 and short > 0  # measured: 14 of 14 layers, 9 of 1024 channels


def test_checkpoint_precision_mismatch(ckpt, micro_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"8-bit weights, but --precision int4 would re-round "
                       r".*--precision int8 \(its integers as they are\)"):
        export(ckpt, tmp_path / "a", ExportConfig(precision="int4"))
    four = tmp_path / "w4"
    quantize(micro_model_dir, four, QuantConfig(method="rtn", group_size=32, symmetric=True))
    with pytest.raises(UserError, match=r"4-bit weights, but --precision int8 would re-round "
                       r".*--precision int4 \(its integers as they are\)"):
        export(four, tmp_path / "b", ExportConfig(precision="int8"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_asymmetric_8bit_is_refused(micro_model_dir, tmp_path):
    asym = tmp_path / "asym"
    quantize(micro_model_dir, asym, QuantConfig(method="rtn", bits=8, group_size=-1,
                                                symmetric=False))
    with pytest.raises(UserError, match=r"an 8-bit one \(strategy channel, symmetric\)"):
        export(asym, tmp_path / "out", ExportConfig(precision="int8"))
