"""onnxruntime-genai compatibility: genai_config.json and the text-only graph genai runs.

The builder's decoder already has genai's IO (attention_mask in, seqlens_k and
total_sequence_length derived inside, KV buffers past and present share). What genai 0.18 does
not take is `inputs_embeds` for a plain decoder model type ("Model input was not found:
input_ids"): its own multimodal pipelines (phi3v, qwen2_5_vl, ...) bring their own vision
processing, and none is LLaVA's. So the export carries a text-only variant of the same graph:

    input_ids (B, S) int64 ─► Gather / GatherBlockQuantized (embedding) ─► inputs_embeds ─► the
    decoder graph as it is (every node and initializer the same)

`onnx/genai_decoder{sfx}.onnx` is a second small .onnx file whose initializers point into the
decoder's own `decoder_model_merged{sfx}.onnx_data`, so the weights are on disk once. The
embedding is the LM head's own weight when the two are tied (the float head keeps the table's
(V, D) layout; a 4/8-bit head's blocks are GatherBlockQuantized's layout too); an untied model
adds its float table to the data file. `onnxruntime_genai.Model(EXPORT_DIR)` then reads
genai_config.json and the tokenizer files the export already holds and generates text; images
stay with edgevlm.runtime.

An M-RoPE decoder (Qwen2-VL, Qwen2.5-VL) keeps its position_ids (3, B, S) input in the genai
graph and is written as genai's "qwen2_5_vl_text" type, the text-only decoder of its Qwen2.5-VL
builder (onnxruntime_genai/models/builder.py: position_ids [3, batch_size, sequence_length],
config input "position_ids"), for which genai feeds the three equal streams of text positions;
Qwen2-VL's decoder is the same graph (its rope is the same sectioned M-RoPE).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgevlm.export.builder.graph import MS_DOMAIN, WeightFile
from edgevlm.export.onnx_io import data_file
from edgevlm.runtime import contract

EMBED_NODE = "/model/embed_tokens"


def _alias(proto: TensorProto, name: str, dims: tuple[int, ...]) -> TensorProto:
    """A second view of an external tensor's bytes, under another name and shape."""
    out = copy.deepcopy(proto)
    out.name = name
    del out.dims[:]
    out.dims.extend(dims)
    return out


def _embedding(graph, built, embed_weight, dtype) -> tuple[list, list]:
    """(nodes, new initializers) computing `inputs_embeds` from `input_ids`."""
    spec = built.spec
    inits = {t.name: t for t in graph.initializer}
    v, d = spec.vocab_size, spec.hidden_size
    if spec.tied and "lm_head.weight" in inits:  # float head, (V, D): the table itself
        return [helper.make_node("Gather", ["lm_head.weight", "input_ids"], ["inputs_embeds"],
                                 name=f"{EMBED_NODE}/Gather", axis=0)], []
    if spec.tied and "lm_head.qweight" in inits and d % built.block_size == 0:
        q = inits["lm_head.qweight"]
        bits = next(a.i for n in graph.node if n.name == "/lm_head/MatMulNBits"
                    for a in n.attribute if a.name == "bits")
        blocks = d // built.block_size
        zp_cols = -(-blocks * bits // 8)
        new = [_alias(q, "embed_tokens.qweight", (v, d * bits // 8)),
               _alias(inits["lm_head.scales"], "embed_tokens.scales", (v, blocks)),
               _alias(inits["lm_head.zero_points"], "embed_tokens.zero_points", (v, zp_cols))]
        node = helper.make_node("GatherBlockQuantized", [new[0].name, "input_ids", new[1].name,
                                                         new[2].name], ["inputs_embeds"],
                                name=f"{EMBED_NODE}/GatherBlockQuantized", domain=MS_DOMAIN,
                                bits=bits, block_size=built.block_size, gather_axis=0,
                                quantize_axis=1)
        return [node], new
    weights = WeightFile(data_file(built.path), append=True)
    try:
        table = weights.tensor("embed_tokens.weight",
                               embed_weight.detach().float().cpu().numpy().astype(dtype))
    finally:
        weights.close()
    return [helper.make_node("Gather", [table.name, "input_ids"], ["inputs_embeds"],
                             name=f"{EMBED_NODE}/Gather", axis=0)], [table]


def write_graph(built, embed_weight) -> Path:
    """The text-only genai graph beside the builder decoder at `built.path`."""
    from edgevlm.export.builder.model import FLOAT_TYPES

    model = onnx.load(str(built.path), load_external_data=False)
    graph = model.graph
    nodes, inits = _embedding(graph, built, embed_weight, FLOAT_TYPES[built.activations][0])
    embeds = next(i for i in graph.input if i.name == "inputs_embeds")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                        [d.dim_param or d.dim_value
                                         for d in embeds.type.tensor_type.shape.dim][:2])
    kept = [i for i in graph.input if i.name != "inputs_embeds"]
    del graph.input[:]
    graph.input.extend([ids, *kept])
    graph.initializer.extend(inits)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    path = built.path.parent / Path(contract.genai_graph_file(built.precision)).name
    onnx.save_model(model, str(path))
    return path


def config(built, export_dir: Path, info: dict, provider_options: list | None = None) -> dict:
    """genai_config.json for the graph `write_graph` made (`info` is the edgevlm.json dict)."""
    spec = built.spec
    eos = info.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    # genai picks its decoder-only pipeline by type; the MoE graph has the same IO as Qwen2's
    gen_type = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2",
                "qwen2_vl_text": "qwen2_5_vl_text",
                "qwen2_5_vl_text": "qwen2_5_vl_text"}[spec.model_type]
    positions = {"position_ids": "position_ids"} if spec.mrope_section else {}
    bos = {} if info.get("bos_token_id") is None else {"bos_token_id": info["bos_token_id"]}
    return {
        "model": {
            **bos,  # genai takes a number or nothing
            "context_length": built.max_context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": provider_options or []},
                "filename": contract.genai_graph_file(built.precision),
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **positions, "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": [e for e in eos if e is not None],
            "pad_token_id": info.get("pad_token_id") if info.get("pad_token_id") is not None
            else eos[0],
            "type": gen_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": built.max_context, "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write(built, embed_weight, export_dir: Path, info: dict,
          provider_options: list | None = None, text_graph: bool = True) -> Path:
    """The genai graph and genai_config.json in `export_dir`; returns the config's path.
    Without `text_graph` only the config is written, the base that edgevlm.export.genai_vlm
    turns into genai's image pipeline over the decoder as it is."""
    if text_graph:
        write_graph(built, embed_weight)
    path = export_dir / contract.GENAI_CONFIG
    path.write_text(json.dumps(config(built, export_dir, info, provider_options), indent=1)
                    + "\n")
    return path
