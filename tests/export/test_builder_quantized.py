"""The decoder builder at int4 and int8: MatMulNBits holds exactly a checkpoint's integers (GPTQ
4-bit in groups, 8-bit per channel) or the project's own RTN of a float model, and the graph
equals torch carrying those integers, tightly and token for token."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgevlm.export import ExportConfig, export
from edgevlm.models import load_model
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.checkpoint import read_int4_layers, read_int8_layers
from edgevlm.quant.primitives import choose_qparams, fake_quantize
from edgevlm.runtime import contract

DECODER = "decoder_model_merged"
NEW_TOKENS = 16


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _nbits_layers(path) -> dict[str, tuple]:
    """{HF module name: (q (N, K), scales (N, G), zero points (N, G), bits)} of every MatMulNBits
    of a built decoder, the packed q/k/v projection split back into its three layers."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    cfg = {a.name: a.i for a in gqa.attribute}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        att = {a.name: a.i for a in node.attribute}
        n, k, bs, bits = att["N"], att["K"], att["block_size"], att["bits"]
        g = -(-k // bs)
        q = _unpack(inits[node.input[1]], bits).reshape(n, g * bs)[:, :k]
        scales = inits[node.input[2]].reshape(n, g)
        zp = _unpack(inits[node.input[3]].reshape(n, -1), bits)[:, :g]
        out[node.input[1].removesuffix(".qweight")] = (q, scales, zp, bits)
    split = {}
    for prefix, (q, s, z, bits) in out.items():
        parts = prefix.split(".")
        if prefix == "lm_head":
            split["lm_head"] = (q, s, z, bits)
            continue
        layer, block, proj = parts[2], parts[3], parts[4]
        base = f"model.language_model.layers.{layer}"
        if proj == "qkv_proj":
            heads, kv = cfg["num_heads"], cfg["kv_num_heads"]
            hd = q.shape[0] // (heads + 2 * kv)
            cuts = np.cumsum([heads * hd, kv * hd])
            for name, rows in zip(("q_proj", "k_proj", "v_proj"),
                                  np.split(np.arange(q.shape[0]), cuts), strict=True):
                split[f"{base}.self_attn.{name}"] = (q[rows], s[rows], z[rows], bits)
        else:
            split[f"{base}.{'self_attn' if block == 'attn' else 'mlp'}.{proj}"] = (q, s, z, bits)
    return split


@pytest.fixture(scope="module")
def gptq(micro_model_dir, shapes_dir, tmp_path_factory):
    """A GPTQ 4-bit checkpoint (groups of 32, asymmetric) exported with the builder."""
    tmp = tmp_path_factory.mktemp("gptq_built")
    quantize(micro_model_dir, tmp / "ckpt",
             QuantConfig(method="gptq", group_size=32, calib_samples=4, batch_size=4),
             calib=shapes_dir / "train.json")
    cfg = ExportConfig(precision="int4", vision_precision="fp32", embed_precision="fp32",
                       new_tokens=NEW_TOKENS)
    return tmp / "ckpt", export(tmp / "ckpt", tmp / "onnx", cfg)


def _assert_graph_check(result):
    parity = result.parity
    assert parity.passed, parity.failures
    check = parity.graph_check
    assert check.steps == NEW_TOKENS and check.tokens_identical
    assert check.max_abs < 1e-5 and check.tolerance == 1e-4
    assert check.accuracy_level == 0 and check.shipped_accuracy_level == 4
    # The shipped graph rounds activations to int8 per block: close, but a second rounding.
    assert check.max_abs < check.shipped_max_abs < 0.05 * np.abs(parity.components[
        DECODER].reference_max_abs)
    decoder = parity.components[DECODER]
    assert not decoder.gated and decoder.max_abs > 10 * check.max_abs  # float vs int4: reported
    stored = json.loads((result.out_dir / contract.MANIFEST).read_text())["parity"]
    assert stored["graph_check"]["matching_steps"] == NEW_TOKENS
    assert stored["components"][DECODER]["gated"] is False


def test_gptq_integers_reach_matmulnbits_unchanged(gptq):
    ckpt, result = gptq
    manifest = json.loads((result.out_dir / contract.MANIFEST).read_text())
    assert manifest["int4_source"] == "checkpoint" and manifest["decoder"]["kind"] == "builder"
    assert manifest["decoder"]["accuracy_level"] == 4 and manifest["decoder"]["block_size"] == 32
    graph = _nbits_layers(result.out_dir / result.components[DECODER].file)
    layers = {n: v for n, v in read_int4_layers(ckpt).items() if "language_model" in n}
    assert len(layers) == 14  # q, k, v, o, gate, up, down of 2 layers
    for name, (q, scale, zp, group) in layers.items():
        gq, gs, gz, bits = graph[name]
        assert bits == 4 and group == 32
        np.testing.assert_array_equal(gq, q, err_msg=name)
        np.testing.assert_array_equal(gs, scale, err_msg=name)
        np.testing.assert_array_equal(gz, zp, err_msg=name)
    assert set(graph) == set(layers) | {"lm_head"}  # lm_head: float there, rounded here
    assert graph["lm_head"][3] == 8  # at 8 bits: the checkpoint kept it out of its 4 bits


def test_gptq_graph_equals_torch_carrying_its_integers(gptq):
    _assert_graph_check(gptq[1])


def test_float_model_int4_is_the_projects_own_rtn(teacher_dir, tmp_path):
    """A float model's int4 is choose_qparams / quantize of edgevlm.quant.primitives (asymmetric
    RTN in blocks of 32), the same integers the torch fake-quant reference carries."""
    result = export(teacher_dir, tmp_path / "out", ExportConfig(precision="int4",
                                                                new_tokens=NEW_TOKENS))
    _assert_graph_check(result)
    model = load_model(teacher_dir).model
    modules = dict(model.named_modules())
    graph = _nbits_layers(tmp_path / "out" / result.components[DECODER].file)
    assert len(graph) == 15
    for name, (q, s, z, _) in graph.items():
        w = modules[name].weight.detach()
        qp = choose_qparams(w, 4, 32, symmetric=False)
        np.testing.assert_array_equal(s, qp.scale.numpy(), err_msg=name)
        np.testing.assert_array_equal(z, qp.zero_point.numpy(), err_msg=name)
        dq = (q.astype(np.float32) - np.repeat(z, 32, 1)) * np.repeat(s, 32, 1)
        np.testing.assert_array_equal(dq, fake_quantize(w, qp).numpy(), err_msg=name)


def test_eight_bit_checkpoint_as_matmulnbits(micro_model_dir, shapes_dir, tmp_path):
    """W8A8 GPTQ (per channel, symmetric) through the builder: 8-bit MatMulNBits blocks that
    repeat each row's scale, so the graph's W is the checkpoint's (q − z)·s exactly."""
    quantize(micro_model_dir, tmp_path / "ckpt",
             QuantConfig(method="gptq", bits=8, group_size=-1, symmetric=True, act_bits=8,
                         calib_samples=4, batch_size=4), calib=shapes_dir / "train.json")
    result = export(tmp_path / "ckpt", tmp_path / "onnx",
                    ExportConfig(precision="int8", new_tokens=NEW_TOKENS))
    _assert_graph_check(result)
    graph = _nbits_layers(tmp_path / "onnx" / result.components[DECODER].file)
    layers = {n: v for n, v in read_int8_layers(tmp_path / "ckpt").items()
              if "language_model" in n}
    assert len(layers) == 14
    for name, (q, scale, zp) in layers.items():
        gq, gs, gz, bits = graph[name]
        assert bits == 8
        got = (gq.astype(np.float32) - np.repeat(gz, 32, 1)) * np.repeat(gs, 32, 1)
        want = (q.astype(np.float32) - zp[:, None].astype(np.float32)) * scale[:, None]
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_accuracy_level_per_profile_and_flag(micro_model_dir, tmp_path):
    def levels(result):
        path = result.out_dir / result.components[DECODER].file
        graph = onnx.load(str(path), load_external_data=False).graph
        return {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"}, result.decoder["accuracy_level"]

    gpu = export(micro_model_dir, tmp_path / "gpu", ExportConfig(profile="gpu", validate=False))
    assert levels(gpu) == ({0}, 0) and gpu.decoder["activations"] == "fp16"
    flag = export(micro_model_dir, tmp_path / "flag", ExportConfig(
        precision="int4", accuracy_level=0, new_tokens=NEW_TOKENS))
    assert levels(flag) == ({0}, 0) and flag.decoder["activations"] == "fp32"
    check = flag.parity.graph_check
    assert check.shipped_accuracy_level == 0 and check.shipped_max_abs == check.max_abs


def test_carry_unties_a_tied_head(clip_llama_config, tokenizer, tmp_path):
    """Carrying int4 into a tied LM head leaves the token embedding float."""
    from edgevlm.export import decoder as dec
    from edgevlm.models import init_model

    cfg = {**clip_llama_config, "tie_word_embeddings": True,
           "text_config": {**clip_llama_config["text_config"], "tie_word_embeddings": True}}
    model = init_model(cfg, tokenizer, seed=0).model
    table = model.get_input_embeddings().weight.detach().clone()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    plan = dec.plan(model, "int4", 32, None)
    dec.carry(model, plan)
    assert torch.equal(model.get_input_embeddings().weight, table)
    assert not torch.equal(model.lm_head.weight, table)
    assert "lm_head.weight" in plan.rounded and len(plan.weights) == 15
