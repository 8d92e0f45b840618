"""onnxruntime-genai runs a builder export as it is: genai_config.json at the export's root, the
text-only graph sharing the decoder's weights file, the export's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgevlm.export import ExportConfig, export
from edgevlm.models import load_model
from edgevlm.runtime import contract

og = pytest.importorskip("onnxruntime_genai")

TOKENS = 32


def _prompt_ids(model_dir) -> list[int]:
    loaded = load_model(model_dir)
    tok = loaded.processor.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What color is the circle?"}],
                                   tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _torch_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=TOKENS,
                             min_new_tokens=TOKENS, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _genai_greedy(export_dir, ids: list[int]) -> list[int]:
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + TOKENS, min_length=len(ids) + TOKENS,
                              do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(ids):]]


def test_genai_generates_transformers_tokens(clip_llama_dir, tmp_path):
    out = tmp_path / "out"
    export(clip_llama_dir, out, ExportConfig(new_tokens=8, max_context=128))
    config = json.loads((out / contract.GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == contract.genai_graph_file("fp32") == "onnx/genai_decoder.onnx"
    assert decoder["inputs"]["input_ids"] == "input_ids" and "inputs_embeds" not in decoder[
        "inputs"]
    assert config["model"]["type"] == "llama" and config["model"]["context_length"] == 128
    assert config["search"]["past_present_share_buffer"] is True
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == (2, 2)
    # One weights file for both graphs: the genai graph adds only the (untied) embedding table.
    assert sorted(p.name for p in (out / "onnx").glob("*_data")) == [
        "decoder_model_merged.onnx_data"]
    assert (out / "onnx" / "genai_decoder.onnx").stat().st_size < 100_000
    ids = _prompt_ids(clip_llama_dir)
    want = _torch_greedy(load_model(clip_llama_dir).model, ids)
    assert _genai_greedy(out, ids) == want and len(want) == TOKENS and len(set(want)) > 4


def test_tied_int4_embedding_reads_the_heads_blocks(clip_llama_config, tokenizer, tmp_path):
    """A tied int4 head: genai's embedding is GatherBlockQuantized over the head's own 4-bit
    blocks (the same bytes in the data file), so it equals torch carrying the head's integers
    in both the head and the embedding (accuracy_level 0: float compute on both sides)."""
    from edgevlm.export import decoder as dec
    from edgevlm.models import init_model, save_model

    cfg = {**clip_llama_config, "tie_word_embeddings": True,
           "text_config": {**clip_llama_config["text_config"], "tie_word_embeddings": True,
                           "initializer_range": 0.1}}  # wide enough that tokens vary
    save_model(init_model(cfg, tokenizer, seed=0), tmp_path / "tied")
    out = tmp_path / "out"
    export(tmp_path / "tied", out, ExportConfig(precision="int4", embed_precision="fp32",
                                                accuracy_level=0, validate=False))
    import onnx

    graph = onnx.load(str(out / contract.genai_graph_file("int4")),
                      load_external_data=False).graph
    assert graph.node[0].op_type == "GatherBlockQuantized"
    inits = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer}
    assert inits["embed_tokens.qweight"]["offset"] == inits["lm_head.qweight"]["offset"]
    model = load_model(tmp_path / "tied").model
    dec.carry(model, dec.plan(model, "int4", 32, None))
    model.get_input_embeddings().weight.data.copy_(model.lm_head.weight.data)
    ids = _prompt_ids(tmp_path / "tied")
    want = _torch_greedy(model, ids)
    assert _genai_greedy(out, ids) == want and len(set(want)) > 4


def test_genai_runs_a_qwen2_5_vl_text_decoder_as_the_runtime(tokenizer, tmp_path):
    """A Qwen2.5-VL builder export's text graph under genai's qwen2_5_vl_text type: genai feeds
    the three equal M-RoPE streams of text positions, and its greedy tokens equal the runtime's
    on a text-only prompt. Its windowed vision graph takes inputs genai does not feed, so the
    config stays text-only and says why. (Qwen2-VL with images through genai:
    tests/export/test_genai_qwen2_vl.py.)"""
    import copy

    from edgevlm.models import PRESETS, init_model, save_model
    from edgevlm.runtime import VLM

    model_dir = tmp_path / "model"
    save_model(init_model(PRESETS["tiny-qwen2.5vl"], copy.deepcopy(tokenizer), seed=0), model_dir)
    out = tmp_path / "out"
    export(model_dir, out, ExportConfig(validate=False), quiet=True)
    model = json.loads((out / contract.GENAI_CONFIG).read_text())["model"]
    assert model["type"] == "qwen2_5_vl_text"
    assert model["decoder"]["inputs"]["position_ids"] == "position_ids"
    genai = json.loads((out / contract.MANIFEST).read_text())["decoder"]["genai"]
    assert not genai["images"] and "window_index" in genai["reason"]
    vlm = VLM.load(out, provider="cpu", threads=1)
    question = "What color is the circle?"
    ids = vlm.tokenizer.encode(vlm.template.render(vlm.messages(None, question),
                                                   add_generation_prompt=True))
    ours = vlm.generate(None, question, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    assert _genai_greedy(out, ids) == list(ours.token_ids)
    assert len(set(ours.token_ids)) > 1
