"""fp32 export: torch parity to float rounding, the manifest, the folder layout."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from edgevlm.export import ExportConfig, export
from edgevlm.export.onnx_io import check
from edgevlm.runtime import contract

DECODER = "decoder_model_merged"


def _assert_fp32_parity(result):
    parity = result.parity
    assert parity.passed, parity.failures
    for component, err in parity.components.items():
        assert err.precision == "fp32"
        assert err.max_abs < 1e-4, component
    greedy = parity.greedy
    assert greedy.new_tokens == 32 and greedy.identical and greedy.matching_prefix == 32
    assert greedy.steps_compared == 32 and greedy.logits_max_abs < 1e-4


def test_tiny_teacher_fp32_parity(teacher_fp32):
    _assert_fp32_parity(teacher_fp32)


def test_clip_llama_fp32_parity(clip_llama_dir, tmp_path):
    result = export(clip_llama_dir, tmp_path / "out", ExportConfig())
    _assert_fp32_parity(result)
    manifest = json.loads((tmp_path / "out" / contract.MANIFEST).read_text())
    assert manifest["text_model_type"] == "llama"
    assert manifest["vision_model_type"] == "clip_vision_model"
    assert manifest["num_image_tokens"] == 4  # (28/14)^2 patches, CLS dropped
    assert manifest["image_processor"]["crop_size"] == {"height": 28, "width": 28}


def test_layout_and_manifest(teacher_fp32, teacher_dir):
    out = teacher_fp32.out_dir
    manifest = json.loads((out / contract.MANIFEST).read_text())
    assert manifest["format_version"] == contract.FORMAT_VERSION
    assert manifest["decoder"]["kind"] == "builder"  # the default profile's decoder
    for component in contract.COMPONENTS:
        entry = manifest["components"][component]
        built = component == DECODER  # the builder always writes <graph>.onnx_data
        assert entry["file"] == contract.graph_file(component, "fp32")
        assert entry["precision"] == "fp32"
        assert entry["external_data"] == (entry["file"] + "_data" if built else None)
        path = out / entry["file"]
        data = out / entry["external_data"] if built else None
        assert entry["bytes"] == path.stat().st_size + (data.stat().st_size if built else 0) > 0
        check(path, ort_ops=built)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        io = contract.graph_io(component, manifest["num_layers"],
                               decoder="builder" if built else "traced")
        assert [i.name for i in session.get_inputs()] == list(io.inputs)
        assert [o.name for o in session.get_outputs()] == list(io.outputs)
        assert manifest["io"][component] == io.to_dict()
    config = json.loads((teacher_dir / "config.json").read_text())
    tc = config["text_config"]
    assert manifest["num_layers"] == tc["num_hidden_layers"] == 2
    assert manifest["num_kv_heads"] == tc["num_key_value_heads"] == 2
    assert manifest["head_dim"] == tc["hidden_size"] // tc["num_attention_heads"] == 64
    assert manifest["vocab_size"] == tc["vocab_size"]
    assert manifest["image_token_id"] == config["image_token_index"]
    assert manifest["num_image_tokens"] == 9
    assert manifest["eos_token_id"] == tc["eos_token_id"]
    assert manifest["pad_token_id"] == tc["pad_token_id"]
    assert manifest["max_position_embeddings"] == 512
    assert "<|im_start|>" in manifest["chat_template"]
    assert manifest["image_processor"]["size"] == {"height": 48, "width": 48}
    assert manifest["image_processor"]["image_mean"] == [0.5, 0.5, 0.5]
    assert manifest["int4_source"] is None
    assert manifest["parity"]["passed"] is True
    assert manifest["config"]["precision"] == "fp32" and manifest["command"]
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["versions"])
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (teacher_dir / name).read_bytes(), name
    # the processor files gain what transformers.js reads (manifest.write_processor_files)
    for name, added in {"tokenizer_config.json": {"chat_template": manifest["chat_template"]},
                        "preprocessor_config.json": {"processor_class": "LlavaProcessor"},
                        "processor_config.json": {"processor_class": "LlavaProcessor",
                                                  "vision_feature_select_strategy": "full",
                                                  "num_additional_image_tokens": 0}}.items():
        theirs, ours = (json.loads((d / name).read_text()) for d in (teacher_dir, out))
        assert ours == {**theirs, **added}, name
    assert not list(out.rglob("*.safetensors"))
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(
        [contract.graph_file(c, "fp32").split("/")[1] for c in contract.COMPONENTS]
        + ["decoder_model_merged.onnx_data", "genai_decoder.onnx"])
    assert (out / contract.GENAI_CONFIG).is_file()


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (3, 4, 5)])
def test_decoder_dynamic_axes(teacher_fp32_traced, batch, seq, past):
    """The traced decoder: batch, sequence and past length are free (past 0 is the first
    step)."""
    import numpy as np

    out = teacher_fp32_traced.out_dir
    manifest = json.loads((out / contract.MANIFEST).read_text())
    assert manifest["decoder"] == {"kind": "traced", "requested": "traced",
                                   "fallback_reason": None}
    path = out / manifest["components"]["decoder_model_merged"]["file"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    n, kv, hd = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    feeds = {"inputs_embeds": rng.standard_normal((batch, seq, manifest["hidden_size"]),
                                                  dtype=np.float32),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
             **{name: rng.standard_normal((batch, kv, past, hd), dtype=np.float32)
                for name in contract.past_names(n)}}
    logits, *presents = session.run(None, feeds)
    assert logits.shape == (batch, seq, manifest["vocab_size"])
    assert all(p.shape == (batch, kv, past + seq, hd) for p in presents)


def test_external_data_flag(teacher_dir, tmp_path):
    """--external-data keeps every graph's weights in one <graph>.onnx_data file, also after
    onnxruntime's quantizers (which name theirs <graph>.onnx.data)."""
    cfg = ExportConfig(precision="int8", vision_precision="fp32", embed_precision="int4",
                       external_data=True)
    result = export(teacher_dir, tmp_path / "out", cfg)
    assert result.parity.passed
    for f in result.components.values():
        graph = tmp_path / "out" / f.file
        assert f.external_data == f.file + "_data"
        data = tmp_path / "out" / f.external_data
        assert graph.stat().st_size < data.stat().st_size
        assert f.bytes == graph.stat().st_size + data.stat().st_size
        check(graph, ort_ops=f.file == result.components[DECODER].file)
    assert len(list((tmp_path / "out" / "onnx").iterdir())) == 7  # and the genai graph
