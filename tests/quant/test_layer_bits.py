"""--layer-bits: mixed precision. Named Linears get their own bits, the checkpoint holds one config
group per bit width, transformers' plain from_pretrained and edgevlm's eval load exactly our
integers, and bad input is named."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.cli.quant import parse_layer_bits
from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, QvlmConfig, quantize

FAST = dict(group_size=32, calib_samples=4, batch_size=4,
            qvlm=QvlmConfig(clip_grid=(1.0, 0.9), clip_strengths=(0.0, 1.0)))
MIXED = (("v_proj", 8), ("mlp.down_proj", 3))


def test_each_layer_gets_its_bits_and_a_scale_rule_that_allows_them():
    cfg = QuantConfig(layer_bits=MIXED)
    assert cfg.bits_for("model.language_model.layers.0.self_attn.v_proj") == 8
    assert cfg.bits_for("model.language_model.layers.1.mlp.down_proj") == 3
    assert cfg.bits_for("model.language_model.layers.1.mlp.up_proj") == 4
    assert cfg.bits_for("model.language_model.layers.1.mlp.xdown_proj") == 4  # whole parts only
    v = cfg.for_layer("layers.0.self_attn.v_proj")
    assert (v.bits, v.scale_rule, v.layer_bits) == (8, "absmax", ())  # signed stops at 4 bits
    d = cfg.for_layer("layers.0.mlp.down_proj")
    assert (d.bits, d.scale_rule) == (3, "signed")
    assert cfg.for_layer("layers.0.mlp.up_proj") is cfg
    # the report's JSON round trip (lists) comes back as pairs
    assert QuantConfig.from_dict({"layer_bits": [["v_proj", 8]]}).layer_bits == (("v_proj", 8),)
    assert parse_layer_bits(" v_proj=8, mlp.down_proj=3") == MIXED


def test_only_a_split_fused_group_is_noted():
    from edgevlm.quant.api import _split_fused

    names = [f"m.layers.0.self_attn.{p}_proj" for p in "qkv"] + ["m.layers.0.mlp.gate_proj"]
    qkv = QuantConfig(layer_bits=(("q_proj", 8), ("k_proj", 8), ("v_proj", 8)))
    assert _split_fused(names, qkv) is None  # vLLM can serve it
    assert "gate_proj 8, up_proj 4 bits" in _split_fused(
        names, QuantConfig(layer_bits=(("gate_proj", 8),)))


@pytest.mark.parametrize("kw, match", [
    (dict(layer_bits=(("v_proj", 9),)), "v_proj=9: the pack-quantized format stores 2..8"),
    (dict(layer_bits=(("v proj", 8),)), "'v proj' is not a module name"),
    (dict(layer_bits=(("v_proj", 8),), symmetric=False), "mixed bits need symmetric weights"),
    (dict(layer_bits=(("v_proj", 8),), bits=8, group_size=-1, act_bits=8),
     "mixed bits are for weight-only"),
])
def test_bad_layer_bits_are_named(kw, match):
    with pytest.raises(UserError, match=match):
        QuantConfig(**kw)


def test_the_cli_names_a_malformed_layer_bits():
    with pytest.raises(UserError, match="'v_proj:8' is not NAME=BITS"):
        parse_layer_bits("v_proj:8")


def test_a_name_no_linear_has_is_refused(micro_model_dir, tmp_path):
    with pytest.raises(UserError, match="--layer-bits wv=8 names no quantized Linear; their "
                                        "names end with down_proj, gate_proj"):
        quantize(micro_model_dir, tmp_path / "q", QuantConfig(method="rtn", layer_bits=(
            ("wv", 8),), **FAST))
    assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def mixed(micro_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    return {m: quantize(micro_model_dir, out / m, QuantConfig(method=m, layer_bits=MIXED, **FAST),
                        calib=shapes_dir / "train.json") for m in ("gptq", "qvlm")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "qvlm"])
def test_mixed_checkpoint_loads_plainly_and_in_eval_with_exactly_our_integers(mixed, method):
    from transformers import LlavaForConditionalGeneration

    from edgevlm.quant.act import load_for_eval

    r = mixed[method]
    bits = {n: qw.bits for n, qw in r.weights.items()}
    assert sorted(bits.values()).count(8) == 2 and sorted(bits.values()).count(3) == 2
    assert all(b == 8 for n, b in bits.items() if n.endswith("v_proj"))
    assert all(b == 3 for n, b in bits.items() if n.endswith("down_proj"))
    assert max(int(qw.q.max()) for n, qw in r.weights.items() if bits[n] == 8) > 15
    assert max(int(qw.q.max()) for n, qw in r.weights.items() if bits[n] == 3) <= 7
    sizes = {n: qw.q.numel() for n, qw in r.weights.items()}
    mean = sum(sizes[n] * bits[n] for n in bits) / sum(sizes.values())
    assert r.report["weight_bits_mean"] == pytest.approx(mean)
    assert r.report["layer_bits"] == {"v_proj": 8, "mlp.down_proj": 3}
    assert "q_proj 4, k_proj 4, v_proj 8 bits in model.language_model.layers.0.self_attn; " \
        "vLLM fuses q_proj + k_proj + v_proj" in r.report["layer_bits_note"]
    qcfg = json.loads((r.out_dir / "config.json").read_text())["quantization_config"]
    held = {g["weights"]["num_bits"]: g["targets"] for g in qcfg["config_groups"].values()}
    assert set(held) == {3, 4, 8} and held[4] == ["Linear"]

    plain = LlavaForConditionalGeneration.from_pretrained(r.out_dir)
    with torch.no_grad():  # a plain load decompresses on the first forward pass
        plain(input_ids=torch.tensor([[1, 2, 3]]))
    ours = load_for_eval(r.out_dir).model
    for model in (plain, ours):
        modules = dict(model.named_modules())
        for name, qw in r.weights.items():
            assert torch.equal(modules[name].weight.data, qw.dequantize()), name
    v = ours.get_submodule(next(n for n in bits if n.endswith("v_proj")))
    assert sorted(n for n, _ in v.named_parameters()) == ["bias", "weight"]  # plain again


@pytest.mark.slow
def test_more_bits_err_less_where_they_are_spent(mixed, micro_model_dir, shapes_dir, tmp_path):
    flat = quantize(micro_model_dir, tmp_path / "flat", QuantConfig(method="gptq", **FAST),
                    calib=shapes_dir / "train.json")
    r = mixed["gptq"]
    for name, rec in r.report["layers"].items():
        if name.endswith("v_proj"):  # 8 bits: far below its 4-bit error
            assert rec["error"] < 0.1 * flat.report["layers"][name]["error"], name
        if name.endswith("down_proj"):  # 3 bits: above it
            assert rec["error"] > flat.report["layers"][name]["error"], name


@pytest.mark.slow
def test_export_carries_8_bit_layers_into_their_own_matmulnbits(micro_model_dir, shapes_dir,
                                                                 tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgevlm.export import ExportConfig, export
    from edgevlm.quant.checkpoint import read_nbits_layers

    r = quantize(micro_model_dir, tmp_path / "q", QuantConfig(
        method="gptq", layer_bits=(("v_proj", 8),), **FAST), calib=shapes_dir / "train.json")
    result = export(r.out_dir, tmp_path / "e", ExportConfig(
        precision="int4", vision_precision="fp32", embed_precision="fp32"))
    assert result.parity.passed, result.parity.failures
    graph = onnx.load(str(result.out_dir / result.components["decoder_model_merged"].file))
    inits = {t.name: t for t in graph.graph.initializer}
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    eight = [n for n in nodes if {a.name: a.i for a in n.attribute}["bits"] == 8
             and "qkv_proj" in n.input[1]]  # (the float LM head is rounded to 8 bits too)
    assert len(eight) == 2  # v_proj of each layer, apart from q and k (4 bits)
    assert sum("qkv_proj" in n.input[1] for n in nodes) == 6
    held = read_nbits_layers(r.out_dir)
    for layer, node in enumerate(eight):
        q, scale, zp, group, bits = held[f"model.language_model.layers.{layer}.self_attn.v_proj"]
        assert bits == 8 and group == 32
        stored = numpy_helper.to_array(inits[node.input[1]]).reshape(q.shape)
        np.testing.assert_array_equal(stored, q)  # the checkpoint's integers, as they are
        np.testing.assert_array_equal(
            numpy_helper.to_array(inits[node.input[2]]).reshape(scale.shape), scale)


@pytest.mark.slow
def test_export_names_what_it_cannot_carry(mixed, micro_model_dir, shapes_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    with pytest.raises(UserError, match="mixes 3 and 4 and 8-bit layers .* export carries "
                                        "4-bit layers with some at 8 bits"):
        export(mixed["gptq"].out_dir, tmp_path / "e", ExportConfig(precision="int4"))
    r = quantize(micro_model_dir, tmp_path / "q", QuantConfig(
        method="rtn", layer_bits=(("v_proj", 8),), **FAST), calib=shapes_dir / "train.json")
    with pytest.raises(UserError, match="holds 8-bit layers of a mixed checkpoint .* only in "
                                        "the built decoder"):
        export(r.out_dir, tmp_path / "t", ExportConfig(precision="int4", decoder="traced",
                                                       vision_precision="fp32"))
    assert not (tmp_path / "e").exists() and not (tmp_path / "t").exists()
