"""fp16 / int8 / int4 exports: checked graphs, errors within stated tolerances, smaller files."""

from __future__ import annotations

import json

import onnx
import pytest

from edgevlm.export import ExportConfig, export
from edgevlm.export.onnx_io import check
from edgevlm.export.validate import RELATIVE_TOLERANCE
from edgevlm.runtime import contract

DECODER = "decoder_model_merged"


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _float_weight_matmuls(path) -> list[str]:
    """MatMul nodes that still multiply by a stored weight (attention's q@k has none)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


# (decoder, vision, embed) precisions; the last one mixes all three kinds of graph, with the
# fp16 vision encoder traced after the model is turned to half precision.
CASES = [("fp16", None, None), ("int8", None, None), ("int4", "fp16", "int4")]


@pytest.fixture(scope="module", params=CASES, ids=["fp16", "int8", "int4-mixed"])
def exported(request, teacher_dir, tmp_path_factory):
    decoder, vision, embed = request.param
    cfg = ExportConfig(precision=decoder, vision_precision=vision, embed_precision=embed)
    out = tmp_path_factory.mktemp(decoder) / "out"
    return export(teacher_dir, out, cfg), cfg


@pytest.mark.slow
def test_graphs_pass_checker_and_tolerances(exported):
    result, cfg = exported
    assert result.parity.passed, result.parity.failures
    for component, precision in cfg.precisions().items():
        f = result.components[component]
        assert f.precision == precision
        assert f.file == contract.graph_file(component, precision)
        check(result.out_dir / f.file, ort_ops=component == DECODER)  # the built decoder
        err = result.parity.components[component]
        assert 0 < err.max_abs < RELATIVE_TOLERANCE[precision] * err.reference_max_abs
        # A built int4/int8 decoder and an int8 vision encoder are gated against torch carrying
        # their integers; against the float model their error is reported only.
        carried = (component == DECODER and precision != "fp16") or (
            component == "vision_encoder" and precision == "int8")
        assert err.gated == (not carried)
    vision = result.parity.vision_check
    if cfg.precisions()["vision_encoder"] == "int8":
        assert vision.passed and vision.kernel_mismatches == 0 and vision.matmuls > 0
        assert vision.max_abs < vision.tolerance < result.parity.components[
            "vision_encoder"].max_abs  # the gate is far tighter than the rounding it ignores
    else:
        assert vision is None
    # fp16 keeps greedy decoding on torch's path. Quantized graphs of a random model may pick
    # another token at once (its top logits are close), but the logits stay within tolerance.
    greedy = result.parity.greedy
    decoder = result.parity.components["decoder_model_merged"]
    assert greedy.new_tokens == 32 and not greedy.required_identical
    if cfg.precision == "fp16":
        assert greedy.identical and greedy.logits_max_abs < 5e-3
    else:
        tol = RELATIVE_TOLERANCE[cfg.precision] * decoder.reference_max_abs
        assert greedy.steps_compared >= 1 and greedy.logits_max_abs < tol
        graph = result.parity.graph_check
        assert graph.tokens_identical and graph.steps == 32 and graph.max_abs < 1e-4


def test_smaller_than_fp32(exported, teacher_fp32):
    result, cfg = exported
    for component, f in result.components.items():
        fp32 = teacher_fp32.components[component].bytes
        assert f.bytes < 0.6 * fp32, (component, f.bytes, fp32)
    if cfg.precision == "int4":
        assert result.components["decoder_model_merged"].bytes < 0.5 * (
            teacher_fp32.components["decoder_model_merged"].bytes)


def test_quantized_ops(exported):
    result, cfg = exported
    expect = {"fp16": None, "int8": {"MatMulInteger", "DynamicQuantizeLinear"},
              "int4": {"MatMulNBits"}}
    for component, f in result.components.items():
        ops = _ops(result.out_dir / f.file)
        if component == DECODER:  # built: 4 or 8 bits in MatMulNBits, float weights in MatMul
            assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
            assert ("MatMulNBits" in ops) == (f.precision != "fp16")
            if f.precision != "fp16":
                assert not _float_weight_matmuls(result.out_dir / f.file)
            else:
                inits = onnx.load(str(result.out_dir / f.file)).graph.initializer
                assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in inits
                           if len(t.dims) == 2)
        elif f.precision == "int4" and component == "embed_tokens":
            assert "GatherBlockQuantized" in ops
        elif f.precision in ("int8", "int4") and component != "embed_tokens":
            assert expect[f.precision] <= ops
            assert not _float_weight_matmuls(result.out_dir / f.file)
        elif f.precision == "fp16":
            inits = onnx.load(str(result.out_dir / f.file)).graph.initializer
            big = [t for t in inits if len(t.dims) == 2]
            assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    manifest = json.loads((result.out_dir / contract.MANIFEST).read_text())
    # Only the vision patch Conv stays float in a quantized graph, and the report says so.
    for component, f in result.components.items():
        want = (("tower.embeddings.patch_embedding.weight",)
                if component == "vision_encoder" and f.precision in ("int8", "int4") else ())
        assert f.float_weights == want
        assert manifest["components"][component]["float_weights"] == list(want)
    assert manifest["int4_source"] == ("rtn" if cfg.precision == "int4" else None)
    assert manifest["config"]["block_size"] == 32


def test_int4_takes_the_faster_int8_vision_encoder(teacher_dir, tmp_path):
    """`--precision int4` without --vision-precision writes an int8 vision encoder (the faster
    kernel on CPU, runtime_speed.json); an explicit --vision-precision int4 is kept."""
    plain = export(teacher_dir, tmp_path / "plain", ExportConfig(precision="int4", validate=False))
    manifest = json.loads((plain.out_dir / "edgevlm.json").read_text())
    got = {c: v["precision"] for c, v in manifest["components"].items()}
    assert got == {"vision_encoder": "int8", "embed_tokens": "int4", DECODER: "int4"}
    assert "MatMulInteger" in _ops(plain.out_dir / plain.components["vision_encoder"].file) or \
        "DynamicQuantizeMatMul" in _ops(plain.out_dir / plain.components["vision_encoder"].file)
    asked = export(teacher_dir, tmp_path / "asked",
                   ExportConfig(precision="int4", vision_precision="int4", validate=False))
    assert asked.components["vision_encoder"].precision == "int4"
    assert "MatMulNBits" in _ops(asked.out_dir / asked.components["vision_encoder"].file)
