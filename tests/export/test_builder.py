"""The decoder builder at fp32: transformers' greedy tokens and logits on the tiny presets and a
CLIP+Llama model, a graph of a few fused ops per layer, its IO, and the bad inputs it names."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgevlm.errors import UserError
from edgevlm.export import ExportConfig, export
from edgevlm.runtime import contract
from edgevlm.runtime.kv_buffer import SharedKV

DECODER = "decoder_model_merged"


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _assert_exact(result):
    parity = result.parity
    assert parity.passed, parity.failures
    assert result.decoder["kind"] == "builder" and result.decoder["fallback_reason"] is None
    assert all(e.max_abs < 1e-4 for e in parity.components.values())
    greedy = parity.greedy
    assert greedy.new_tokens == greedy.matching_prefix == 32 and greedy.identical
    assert greedy.logits_max_abs < 1e-4


def test_tiny_presets_give_transformers_tokens(teacher_fp32, teacher_dir, tokenizer, tmp_path):
    from edgevlm.models import PRESETS, init_model, save_model

    _assert_exact(teacher_fp32)  # tiny-teacher: Qwen2, 2 layers, 4 heads over 2 KV heads
    save_model(init_model(PRESETS["tiny-student"], tokenizer, seed=0), tmp_path / "student")
    _assert_exact(export(tmp_path / "student", tmp_path / "out", ExportConfig()))


def test_clip_llama_gives_transformers_tokens(clip_llama_dir, tmp_path):
    result = export(clip_llama_dir, tmp_path / "out", ExportConfig(decoder="builder"))
    _assert_exact(result)
    ops = _ops(tmp_path / "out" / result.components[DECODER].file)
    assert "Add" not in ops  # Llama: no q/k/v biases (Qwen2's are one Add per layer)


def test_graph_is_a_few_fused_ops_per_layer(teacher_fp32, teacher_fp32_traced):
    """Per layer: 2 norms, the packed QKV MatMul and its bias Add, GroupQueryAttention, o_proj,
    and the SwiGLU MLP (3 MatMuls, Sigmoid, 2 Mul): 12; plus 6 nodes deriving seqlens_k and
    total_sequence_length from the mask, and the final norm, last position, LM head and
    Unsqueeze."""
    built = teacher_fp32.out_dir / teacher_fp32.components[DECODER].file
    traced = teacher_fp32_traced.out_dir / teacher_fp32_traced.components[DECODER].file
    ops, layers = _ops(built), 2
    assert sum(ops.values()) == 12 * layers + 6 + 4 == teacher_fp32.decoder["nodes"] == 34
    assert ops["GroupQueryAttention"] == layers and ops["SimplifiedLayerNormalization"] == 1
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["MatMul"] == 5 * layers and ops["Gemm"] == 1  # the LM head, weight (V, D)
    assert sum(_ops(traced).values()) > 10 * sum(ops.values())
    graph = onnx.load(str(built), load_external_data=False).graph
    names = {n.name for n in graph.node}
    assert {"/model/layers.1/attn/GroupQueryAttention", "/model/layers.0/attn/qkv_proj/MatMul",
            "/model/layers.1/mlp/down_proj/MatMul", "/lm_head/Gemm"} <= names
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    assert list(gqa.input[3:5]) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert list(gqa.output[1:]) == ["present.0.key", "present.0.value"]


def test_io_and_shared_buffers(teacher_fp32):
    """The contract's builder IO; a pass writes its S entries into the buffers at start.., one
    (1, 1, V) logits row, and a 3-step prefill in chunks equals one pass."""
    out = teacher_fp32.out_dir
    manifest = json.loads((out / contract.MANIFEST).read_text())
    io = contract.builder_decoder_io(2)
    assert manifest["io"][DECODER] == io.to_dict()
    assert manifest["decoder"]["max_context"] == 512  # min(max_position_embeddings, 2048)
    session = ort.InferenceSession(str(out / teacher_fp32.components[DECODER].file),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(io.inputs)
    assert [o.name for o in session.get_outputs()] == list(io.outputs)
    kv = SharedKV(session, 2)
    embeds = np.random.default_rng(0).standard_normal((1, 7, 256)).astype(np.float32)
    whole = kv.new_cache(16)
    logits = kv.decode(embeds, 0, whole)
    assert logits.shape == (1, 1, manifest["vocab_size"])
    keys = whole[0].numpy()
    assert keys.shape == (1, 2, 16, 64) and np.abs(keys[0, :, :7]).min() > 0
    assert not keys[0, :, 7:].any()
    chunked = kv.new_cache(16)
    kv.decode(embeds[:, :4], 0, chunked)
    np.testing.assert_allclose(kv.decode(embeds[:, 4:], 4, chunked), logits, atol=1e-5)
    np.testing.assert_allclose(chunked[3].numpy(), whole[3].numpy(), atol=1e-5)


def _save(config: dict, tokenizer, out):
    from edgevlm.models import init_model, save_model

    save_model(init_model(config, tokenizer, seed=0), out)
    return out


def _variant(clip_llama_config, **text) -> dict:
    return {**clip_llama_config, "text_config": {**clip_llama_config["text_config"], **text}}


def test_uncovered_text_model_falls_back_to_traced(clip_llama_config, tokenizer, tmp_path):
    """By default a decoder the builder cannot write is traced, and the export says why; named
    explicitly, the builder refuses instead."""
    model = _save(_variant(clip_llama_config, hidden_size=96, num_attention_heads=4),
                  tokenizer, tmp_path / "heads24")
    result = export(model, tmp_path / "out", ExportConfig(new_tokens=8))
    assert result.parity.passed, result.parity.failures
    assert result.decoder["kind"] == "traced" and result.decoder["requested"] == "builder"
    assert result.decoder["fallback_reason"].startswith("head size 24 ")
    manifest = json.loads((tmp_path / "out" / contract.MANIFEST).read_text())
    assert manifest["decoder"] == result.decoder
    assert manifest["io"][DECODER] == contract.decoder_io(2).to_dict()
    assert not (tmp_path / "out" / contract.GENAI_CONFIG).exists()


def test_coverage_reasons():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from edgevlm.export.builder.spec import unsupported

    assert unsupported(LlamaConfig()) is None and unsupported(Qwen2Config()) is None
    assert unsupported(MistralConfig()) == ("the decoder builder covers text models llama, "
                                            "qwen2, qwen2_moe, qwen2_vl_text, qwen2_5_vl_text, "
                                            "not 'mistral'")
    from transformers import Qwen2MoeConfig

    assert "shared expert is not implemented" in unsupported(Qwen2MoeConfig())
    assert unsupported(Qwen2MoeConfig(shared_expert_intermediate_size=0)) is None
    assert "sliding-window" in unsupported(Qwen2Config(use_sliding_window=True,
                                                       max_window_layers=0))
    assert "hidden_act 'gelu'" in unsupported(LlamaConfig(hidden_act="gelu"))
    yarn = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                     "original_max_position_embeddings": 1024})
    assert unsupported(yarn) is None  # length-independent frequencies: exact caches


@pytest.mark.parametrize("text,message", [
    (dict(hidden_size=96, num_attention_heads=4), "head size 24 .* multiple of 16"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not "
     "implemented by the decoder builder"),
], ids=["head-size", "rope-type"])
def test_what_gqa_cannot_take_is_named(clip_llama_config, tokenizer, tmp_path, text, message):
    model = _save(_variant(clip_llama_config, **text), tokenizer, tmp_path / "m")
    with pytest.raises(UserError, match=message + ".*--decoder traced"):
        export(model, tmp_path / "out", ExportConfig(decoder="builder"))
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_fix(teacher_dir, tmp_path):
    with pytest.raises(UserError, match="--decoder 'fused' is unknown"):
        ExportConfig(decoder="fused")
    with pytest.raises(UserError, match="--accuracy-level 5"):
        ExportConfig(accuracy_level=5)
    with pytest.raises(UserError, match="--max-context 4096 is over the model's "
                                        "max_position_embeddings 512"):
        export(teacher_dir, tmp_path / "a", ExportConfig(max_context=4096))
    with pytest.raises(UserError, match=r"validation needs \d+ positions .* give at least "
                                        r"--max-context \d+, or --no-validate"):
        export(teacher_dir, tmp_path / "b", ExportConfig(max_context=16))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=lambda r: r["rope_type"])
def test_rope_scaling_types_are_exact(clip_llama_config, tokenizer, tmp_path, rope):
    """The cos/sin caches come from the model's own rotary module (yarn's attention factor
    included), so scaled RoPE matches transformers as the default does."""
    model = _save(_variant(clip_llama_config, rope_scaling={**rope, "rope_theta": 10000.0}),
                  tokenizer, tmp_path / "m")
    result = export(model, tmp_path / "out", ExportConfig(decoder="builder", new_tokens=8))
    assert result.parity.passed, result.parity.failures
    assert result.parity.greedy.identical and result.parity.greedy.logits_max_abs < 1e-4
