"""A LLaVA built with transformers alone (a SigLIP tower, a text-only chat template; outside
edgevlm's presets and `init`) exports at the default int4 with validation on: its automatic int8
vision encoder is gated against torch carrying the same integers, and a tower whose int8
features move past the budget stays in float and says so."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgevlm.export import ExportConfig, export
from edgevlm.export.vision_int8 import CARRIED_TOLERANCE, INT8_BUDGET, dynamic_quantize
from tests.export.hf_llava import build

# SMALL_VISION: 2 layers x (q, k, v, out, fc1, fc2) and the projector's 2 Linears
MATMULS = 2 * 6 + 2


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hf") / "llava")


@pytest.fixture(scope="module")
def outlier_tower(foreign, tmp_path_factory):
    """The same model with one channel of the first MLP's input scaled 300x and its weights
    scaled down as much (the layer computes the same), as real towers carry a few huge
    activation channels that their weights damp: per-tensor uint8 activations then spend their
    range on that channel and round every other one to a few levels."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("hf") / "outlier"
    shutil.copytree(foreign, out)
    model = LlavaForConditionalGeneration.from_pretrained(foreign)
    with torch.no_grad():
        norm = model.model.vision_tower.encoder.layers[0].layer_norm2
        fc1 = model.model.vision_tower.encoder.layers[0].mlp.fc1
        norm.weight[3] *= 300.0
        norm.bias[3] *= 300.0
        fc1.weight[:, 3] /= 300.0
    model.save_pretrained(out)
    return out


def _check_gate(result):
    check = result.parity.vision_check
    assert check.matmuls == MATMULS and check.kernel_mismatches == 0
    assert check.max_abs < check.tolerance
    assert check.tolerance == pytest.approx(max(CARRIED_TOLERANCE * check.reference_max_abs,
                                                1e-6))
    return check


def test_default_int4_exports_with_validation(foreign, tmp_path):
    result = export(foreign, tmp_path / "x", ExportConfig(precision="int4"))
    assert result.parity.passed, result.parity.failures
    entry = result.vision_int8
    assert entry["precision"] == "int8" and entry["automatic"] is True
    assert 0 < entry["relative_error"] < entry["budget"] == INT8_BUDGET
    check = _check_gate(result)
    # reported, not gated: the shipped graph quantizes activations as torch does, up to flips
    assert check.shipped_max_abs < 0.05 * check.reference_max_abs
    vision = result.parity.components["vision_encoder"]
    assert vision.gated is False and vision.max_abs > check.max_abs
    manifest = json.loads((tmp_path / "x" / "edgevlm.json").read_text())
    assert manifest["vision_int8"] == entry
    assert manifest["components"]["vision_encoder"]["precision"] == "int8"
    assert manifest["parity"]["vision_check"]["kernel_mismatches"] == 0


def test_int8_weights_are_stored_unsigned(foreign, tmp_path):
    """uint8 weights with zero point 128: onnxruntime's u8·s8 kernel saturates on AVX2."""
    import onnx
    from onnx import numpy_helper

    export(foreign, tmp_path / "x", ExportConfig(precision="int4"))
    graph = onnx.load(str(tmp_path / "x" / "onnx" / "vision_encoder_int8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(weights) == MATMULS
    for name in weights:
        zero = inits[name.replace("_quantized", "_zero_point")]
        assert inits[name].dtype == np.uint8 and np.all(zero == 128)
        assert inits[name].min() >= 0 and inits[name].max() <= 255


def test_an_over_budget_tower_stays_float(outlier_tower, tmp_path):
    result = export(outlier_tower, tmp_path / "x", ExportConfig(precision="int4"))
    assert result.parity.passed, result.parity.failures
    entry = result.vision_int8
    assert entry["precision"] == "fp32" and entry["automatic"] is True
    assert entry["relative_error"] > INT8_BUDGET and "stays fp32" in entry["why"]
    assert result.components["vision_encoder"].precision == "fp32"
    assert result.parity.vision_check is None
    manifest = json.loads((tmp_path / "x" / "edgevlm.json").read_text())
    assert manifest["vision_int8"]["precision"] == "fp32"
    assert manifest["components"]["vision_encoder"]["file"] == "onnx/vision_encoder.onnx"


def test_int8_asked_for_ships_and_is_still_gated(outlier_tower, tmp_path):
    result = export(outlier_tower, tmp_path / "x",
                    ExportConfig(precision="int4", vision_precision="int8"))
    assert result.parity.passed, result.parity.failures
    entry = result.vision_int8
    assert entry["precision"] == "int8" and entry["automatic"] is False
    assert entry["relative_error"] > INT8_BUDGET  # reported: the user chose int8
    _check_gate(result)


def test_dynamic_quantize_follows_the_onnx_spec():
    """DynamicQuantizeLinear on a known tensor: range [-1, 3] widened to include 0, scale 4/255,
    zero point round(255/4) = 64, values rounded half to even, saturated."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper

    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 0.0313725], np.float32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [7])],
                              [helper.make_tensor_value_info("y", 2, [7]),
                               helper.make_tensor_value_info("s", 1, []),
                               helper.make_tensor_value_info("z", 2, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y, s, z = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert int(z) == 64 and float(s) == pytest.approx(4 / 255)
    ours = dynamic_quantize(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ours, (y.astype(np.float32) - z.astype(np.float32)) * s)
    assert onnx.checker.check_model(model) is None
