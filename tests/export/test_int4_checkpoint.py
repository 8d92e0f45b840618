"""int4 export of a quantized checkpoint: the MatMulNBits initializers hold exactly the
checkpoint's integers, scales and zero points, and the graphs match torch running the same
dequantized weights to float rounding (not to int4 error). The "ragged" case asks for groups of
64 on a 96-wide text model (the checkpoint holds 32, see tests/quant/test_ragged.py); the float
model's RTN export with blocks of 64 writes ragged last blocks, checked the same way."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgevlm.errors import UserError
from edgevlm.export import ExportConfig, export
from edgevlm.export.graphs import text_dims, wrapper
from edgevlm.export.validate import torch_reference, validate
from edgevlm.models import load_model
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.checkpoint import read_int4_layers
from edgevlm.quant.primitives import choose_qparams
from edgevlm.runtime import contract

# Symmetric: decoder int4 only. Asymmetric: vision Linears quantized too and exported as int4.
CASES = {
    "sym": (dict(symmetric=True), dict(vision_precision="fp32")),
    "asym": (dict(symmetric=False, quantize_vision=True), dict()),
    "ragged": (dict(method="gptq", group_size=64, symmetric=True), dict(vision_precision="fp32")),
}
# Of the largest reference output: MatMulNBits is dequantize + matmul in fp32 (measured ~5e-7).
RELATIVE = 1e-3


@pytest.fixture(scope="module", params=list(CASES))
def case(request, shapes_dir, tmp_path_factory):
    qkw, ekw = CASES[request.param]
    model_dir = request.getfixturevalue(
        "ragged_model_dir" if request.param == "ragged" else "micro_model_dir")
    tmp = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    quantize(model_dir, tmp / "ckpt",
             QuantConfig(**{"method": "rtn", "group_size": 32, "calib_samples": 4,
                            "batch_size": 4, **qkw}),
             calib=shapes_dir / "train.json")
    # The traced decoder: onnxruntime's int4 of the traced graph, with the checkpoint's integers
    # put in by name (the builder's are checked in test_builder_quantized.py).
    cfg = ExportConfig(precision="int4", embed_precision="fp32", new_tokens=16,
                       decoder="traced", **ekw)
    result = export(tmp / "ckpt", tmp / "onnx", cfg)
    return tmp / "ckpt", result, cfg


def _unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """(..., m) uint8 -> (..., 2m) values, low nibble first; the first `count` of the last axis."""
    out = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :count]


def _int4_layers(path) -> dict[str, tuple]:
    """{graph module name: (q (N,K), scales (N,G), zero points (N,G), block)} of every
    MatMulNBits; G = ceil(K / block), and a ragged last block's padding is dropped from q."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        att = {a.name: a.i for a in node.attribute}
        n, k, bs = att["N"], att["K"], att["block_size"]
        g = -(-k // bs)
        q = _unpack(inits[node.input[1]], bs).reshape(n, g * bs)[:, :k]
        scales = inits[node.input[2]].reshape(n, g)
        zp = _unpack(inits[node.input[3]].reshape(n, -1), g)
        name = node.input[2].removesuffix("_scales").removesuffix(".scales")
        out[name.removesuffix(".weight")] = (q, scales, zp, bs)
    return out


def _dequantize(q, s, z, bs) -> np.ndarray:
    """(q − z)·s per column, each column taking its block's scale and zero point (blocks of
    `bs` columns: a ragged last block makes K / G smaller than bs)."""
    per = lambda t: np.repeat(t, bs, axis=1)[:, :q.shape[1]]  # noqa: E731
    return (q.astype(np.float32) - per(z)) * per(s)


def _same_weights_in_torch(model, result, precisions) -> None:
    """Give torch the int4 graphs' own weights (a quantized checkpoint's, or the exporter's
    rounding of float layers), so both sides multiply by identical numbers."""
    with torch.no_grad():
        for component, precision in precisions.items():
            if precision != "int4":
                continue
            module = wrapper(component, model)
            for name, layer in _int4_layers(
                    result.out_dir / result.components[component].file).items():
                module.get_submodule(name).weight.copy_(torch.from_numpy(_dequantize(*layer)))


def _graph_name(component: str, model, hf_name: str) -> str | None:
    hf = dict(model.named_modules())[hf_name]
    return next((n for n, m in wrapper(component, model).named_modules() if m is hf), None)


@pytest.mark.slow
def test_graph_holds_checkpoint_integers_exactly(case):
    ckpt, result, cfg = case
    manifest = json.loads((result.out_dir / contract.MANIFEST).read_text())
    assert manifest["int4_source"] == "checkpoint" and manifest["config"]["block_size"] == 32
    assert result.parity.passed, result.parity.failures
    layers = read_int4_layers(ckpt)
    model = load_model(ckpt, dequantize=True).model
    found = 0
    for component, precision in cfg.precisions().items():
        if precision != "int4":
            continue
        graph = _int4_layers(result.out_dir / result.components[component].file)
        for hf_name, (q, scale, zp, group) in layers.items():
            name = _graph_name(component, model, hf_name)
            if name is None or (component == "vision_encoder" and ".head." in name):
                continue  # another component's layer, or SigLIP's pooling head (not traced)
            assert group == 32
            gq, gs, gz, _ = graph[name]
            np.testing.assert_array_equal(gq, q, err_msg=name)
            np.testing.assert_array_equal(gs, scale, err_msg=name)
            np.testing.assert_array_equal(gz, zp, err_msg=name)
            found += 1
    assert found == len([n for n in layers if ".head." not in n]) > 0
    if not cfg.vision_precision:  # asymmetric case: vision layers were quantized and exported
        assert any(n.startswith("model.vision_tower") for n in layers)


def test_parity_with_torch_on_the_same_weights(case):
    ckpt, result, cfg = case
    precisions = cfg.precisions()
    loaded = load_model(ckpt, dequantize=True)
    model = loaded.model
    # Layers the checkpoint kept in float (lm_head, projector) were rounded by the exporter;
    # give torch those same rounded weights so every weight on both sides is identical.
    _same_weights_in_torch(model, result, precisions)
    ref = torch_reference(loaded, new_tokens=16)
    paths = {c: result.out_dir / f.file for c, f in result.components.items()}
    parity = validate(paths, precisions, ref, text_dims(model.config))
    for component, err in parity.components.items():
        assert err.max_abs < RELATIVE * err.reference_max_abs, (component, err)
    assert parity.greedy.new_tokens == 16 and parity.greedy.identical
    assert parity.greedy.logits_max_abs < RELATIVE * np.abs(ref.step_logits).max()


def test_conflicting_block_size(case, tmp_path):
    ckpt, _, _ = case
    with pytest.raises(UserError, match="--block-size 64 conflicts with the group size 32"):
        export(ckpt, tmp_path / "out", ExportConfig(precision="int4", block_size=64))
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_config(micro_model_dir, tmp_path):
    import shutil

    model = tmp_path / "q"
    shutil.copytree(micro_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 8}}}}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="needs a 4-bit pack-quantized checkpoint"):
        export(model, tmp_path / "out", ExportConfig(precision="int4"))


def _gather_int4(path) -> dict[str, tuple]:
    """{graph module name: (q (V,D), scales (V,G), zero points (V,G), block)} of every
    GatherBlockQuantized (embedding tables, quantized along D)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            q, s, z = (inits[x].astype(np.float32) for x in
                       (node.input[0], node.input[2], node.input[3]))
            bs = next(a.i for a in node.attribute if a.name == "block_size")
            out[node.input[0].removesuffix("_Q4").removesuffix(".weight")] = (q, s, z, bs)
    return out


def test_float_model_int4_with_ragged_blocks(ragged_model_dir, tmp_path):
    """Blocks of 64 over 96-wide layers: every MatMulNBits (and the embedding's
    GatherBlockQuantized) holds ceil(96/64) = 2 blocks per row, the second ragged, and the
    graphs equal torch carrying those same integers to float rounding."""
    cfg = ExportConfig(precision="int4", vision_precision="int4", block_size=64, new_tokens=16,
                       decoder="traced")
    result = export(ragged_model_dir, tmp_path / "onnx", cfg)
    assert result.parity.passed, result.parity.failures
    manifest = json.loads((result.out_dir / contract.MANIFEST).read_text())
    assert manifest["int4_source"] == "rtn" and manifest["config"]["block_size"] == 64
    loaded = load_model(ragged_model_dir)
    precisions = cfg.precisions()
    decoder = _int4_layers(result.out_dir / result.components["decoder_model_merged"].file)
    ragged = {n: q.shape for n, (q, *_) in decoder.items() if q.shape[1] % 64}
    assert len(ragged) == 2 * 6 + 1  # q, k, v, o, gate, up of 2 layers read 96 columns; lm_head
    assert all(decoder[n][1].shape[1] == 2 for n in ragged)
    # A ragged block's scale is that of its own 32 columns (the quantizer pads with zeros,
    # which every min/max range already holds): compare with our primitives on those columns.
    name = next(iter(ragged))
    w = wrapper("decoder_model_merged", loaded.model).get_submodule(name).weight.detach()
    own = choose_qparams(w[:, 64:], 4, -1, symmetric=False)
    np.testing.assert_allclose(decoder[name][1][:, 1:], own.scale.numpy(), rtol=1e-5)
    _same_weights_in_torch(loaded.model, result, precisions)
    embed = _gather_int4(result.out_dir / result.components["embed_tokens"].file)
    assert [(s.shape[1], bs) for _, s, _, bs in embed.values()] == [(2, 64)]
    with torch.no_grad():
        module = wrapper("embed_tokens", loaded.model)
        for n, layer in embed.items():
            module.get_submodule(n).weight.copy_(torch.from_numpy(_dequantize(*layer)))
    ref = torch_reference(loaded, new_tokens=16)
    paths = {c: result.out_dir / f.file for c, f in result.components.items()}
    parity = validate(paths, precisions, ref, text_dims(loaded.model.config))
    for component, err in parity.components.items():
        assert err.max_abs < RELATIVE * err.reference_max_abs, (component, err)
    assert parity.greedy.new_tokens == 16 and parity.greedy.identical
