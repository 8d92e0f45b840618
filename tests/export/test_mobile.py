"""--profile mobile: static graphs that NNAPI/CoreML take whole, parity with torch, ORT format."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevlm.errors import UserError
from edgevlm.export import ExportConfig, export, readiness
from edgevlm.export.validate import RELATIVE_TOLERANCE
from edgevlm.runtime import contract

CONTEXT = 64
# Ops the default graphs compute masks, rotary tables and norms with; none may remain.
DYNAMIC_OPS = {"Range", "Equal", "Where", "Expand", "Shape", "Cos", "Sin", "Erf",
               "LayerNormalization", "ReduceMean", "Neg", "Unsqueeze"}


@pytest.fixture(scope="module")
def mobile(tmp_path_factory, micro_model_dir):
    out = tmp_path_factory.mktemp("mobile") / "out"
    result = export(micro_model_dir, out, ExportConfig(profile="mobile", max_context=CONTEXT,
                                                       new_tokens=16))
    return result, json.loads((out / contract.MANIFEST).read_text())


@pytest.fixture(scope="module")
def plain_readiness(tmp_path_factory, micro_model_dir):
    out = tmp_path_factory.mktemp("plain") / "out"
    result = export(micro_model_dir, out, ExportConfig(validate=False, decoder="traced"))
    return readiness.measure({c: out / f.file for c, f in result.components.items()})


def test_mobile_matches_torch_within_fp16_tolerance(mobile):
    result, manifest = mobile
    parity = result.parity
    assert parity.passed, parity.failures
    for name, e in parity.components.items():
        assert e.precision == "fp16"
        assert e.max_abs < RELATIVE_TOLERANCE["fp16"] * e.reference_max_abs, name
    assert parity.greedy.matching_prefix == parity.greedy.new_tokens == 16
    assert manifest["parity"]["passed"] and manifest["profile"] == "mobile"


def test_mobile_meets_readiness_targets_plain_export_does_not(mobile, plain_readiness):
    result, manifest = mobile
    assert result.readiness.misses == []
    stored = manifest["readiness"]["components"]
    for component, (share, parts) in readiness.TARGETS.items():
        for ep in readiness.EPS:
            r = result.readiness.components[component][ep]
            assert r.share >= share and r.partitions <= parts, (component, ep, r)
            assert stored[component][ep]["partitions"] == r.partitions
    # The same measurement on the default graphs falls far short and names the blockers.
    plain = plain_readiness.components
    assert plain["vision_encoder"]["nnapi"].share < 0.5
    assert plain["decoder_model_merged"]["coreml_mlprogram"].share < 0.5
    assert any("Range" in m for m in plain_readiness.misses)
    assert any("Erf" in m for m in plain_readiness.misses)


def test_mobile_graphs_are_static_and_plain(mobile):
    result, manifest = mobile
    assert manifest["static_shapes"] == {"batch": 1, "image_size": 48, "context": CONTEXT,
                                         "step": 1}
    for component, f in result.components.items():
        graph = onnx.load(str(result.out_dir / f.file)).graph
        for value in [*graph.input, *graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), (component, value.name)
        assert not {n.op_type for n in graph.node} & DYNAMIC_OPS, component
    rope = np.load(result.out_dir / manifest["rope_file"])
    assert rope.shape == (2, CONTEXT, 32)


def test_ort_format_graphs_load_and_agree(mobile):
    result, manifest = mobile
    onnx_path = result.out_dir / result.components["vision_encoder"].file
    ort_path = result.out_dir / manifest["ort_format"]["vision_encoder"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels})[0] for p in (onnx_path, ort_path)]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)
    assert set(manifest["ort_format"]) == set(contract.COMPONENTS)


def test_profile_errors_name_the_fix(micro_model_dir, tmp_path):
    with pytest.raises(UserError, match="not available with --profile mobile"):
        ExportConfig(profile="mobile", precision="int8")
    with pytest.raises(UserError, match="--profile mobile or --decoder builder"):
        ExportConfig(max_context=128, decoder="traced")
    with pytest.raises(UserError, match="--decoder builder is not available with --profile"):
        ExportConfig(profile="mobile", decoder="builder")
    with pytest.raises(UserError, match="unknown"):
        ExportConfig(profile="phone")
    with pytest.raises(UserError, match="max_position_embeddings 256"):
        export(micro_model_dir, tmp_path / "x", ExportConfig(profile="mobile", max_context=4096))
    assert ExportConfig(profile="gpu").precisions() == {
        "vision_encoder": "fp16", "embed_tokens": "fp16", "decoder_model_merged": "int4"}


def test_unsupported_model_names_what_blocks_it(micro_model_dir):
    from edgevlm.export import mobile as mobile_graphs
    from edgevlm.models import load_model

    model = load_model(micro_model_dir).model
    model.config.projector_hidden_act = "elu"
    with pytest.raises(UserError, match="projector_hidden_act='elu'"):
        mobile_graphs.check_supported(model)
