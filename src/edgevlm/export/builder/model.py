"""The decoder graph, written from the weights: the layer loop, the final norm, the LM head.

    inputs_embeds (B, S, D) float32 ─[Cast: fp16 graphs]─ h
    attention_mask (B, T) ──► seqlens_k, total_sequence_length              (attention.py)
    position_ids (3, B, S) ──► merged M-RoPE cos/sin rows   (M-RoPE decoders only: mrope.py)
    layer 0:   SimplifiedLayerNorm(h) ─► attn ─► SkipSimplifiedLayerNorm(+h) ─► mlp
    layer i:   SkipSimplifiedLayerNorm(mlp_{i-1} + residual) ─► attn ─► SkipSimplifiedLayerNorm
               (+residual) ─► mlp                                           (norms.py, mlp.py)
    final:     SkipSimplifiedLayerNorm(mlp_last + residual) (B, S, D)
               ─► Gather(axis 1, index -1) (B, D): the last position only
               ─► lm_head: Gemm(transB, W (V, D)) or MatMulNBits ─► Unsqueeze (B, 1, V)
               ─[Cast: fp16 graphs]─► logits float32

The IO is runtime/contract.py's builder_decoder_io: past_key_values.{i}.key|value are buffers of
`max_context` positions that present.{i}.* share. Only the logits of the last position are
computed: prefill needs no more, and a 200-token prompt over a 50k vocabulary would otherwise
spend a tenth of its time in the LM head. The float LM head keeps its weight (V, D), the
embedding table's layout, so a tied head and genai's embedding (genai.py) store it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edgevlm.export.builder import attention as attn
from edgevlm.export.builder import mrope
from edgevlm.export.builder.graph import Graph, WeightFile
from edgevlm.export.builder.linear import Linears
from edgevlm.export.builder.mlp import mlp
from edgevlm.export.builder.norms import rms_norm, skip_rms_norm
from edgevlm.export.builder.spec import TextSpec, rotary_caches, text_spec
from edgevlm.runtime import contract
from edgevlm.runtime.contract import Activations, Precision

FLOAT_TYPES = {"fp32": (np.dtype(np.float32), TensorProto.FLOAT),
               "fp16": (np.dtype(np.float16), TensorProto.FLOAT16)}


@dataclass(frozen=True)
class BuiltDecoder:
    """What was written, for the manifest and the genai config."""

    path: Path
    spec: TextSpec
    precision: str
    activations: str  # "fp32" | "fp16": the float type inside the graph and of the KV buffer
    max_context: int  # positions of the KV buffer
    accuracy_level: int | None  # MatMulNBits; None for float graphs
    block_size: int | None
    nodes: int


def _io(g: Graph, spec: TextSpec, kv_type: int) -> tuple[str, str, list, list]:
    io = contract.builder_decoder_io(spec.num_layers)
    g.input("inputs_embeds", TensorProto.FLOAT, io.inputs["inputs_embeds"][:2]
            + (spec.hidden_size,))
    g.input("attention_mask", TensorProto.INT64, io.inputs["attention_mask"])
    shape = lambda axes: (axes[0], spec.num_kv_heads, axes[2], spec.head_dim)  # noqa: E731
    past = contract.past_names(spec.num_layers)
    present = contract.present_names(spec.num_layers)
    for n in past:
        g.input(n, kv_type, shape(io.inputs[n]))
    g.output("logits", TensorProto.FLOAT, io.outputs["logits"][:2] + (spec.vocab_size,))
    for n in present:
        g.output(n, kv_type, shape(io.outputs[n]))
    return "inputs_embeds", "attention_mask", past, present


def _lm_head(g: Graph, x: str, lm_head, linears: Linears) -> str:
    """(B, D) -> (B, V)."""
    if linears.weights is not None:
        return linears(g, x, "/lm_head", "lm_head", [("lm_head.weight", lm_head)])
    w = lm_head.weight.detach().float().cpu().numpy().astype(linears.dtype)  # (V, D)
    return g.node("Gemm", [x, g.weight("lm_head.weight", w)], "/lm_head/Gemm", transB=1)[0]


def _rope(g: Graph, decoder, spec: TextSpec, max_context: int, dtype,
          mrope_layout: str) -> mrope.Rope:
    caches = attn.rotary(g, *rotary_caches(decoder.text.rotary_emb,
                                           min(max_context, spec.max_positions)), dtype)
    if spec.mrope_section is None:
        return mrope.Rope(*caches)
    return mrope.rope(g, caches, spec.mrope_section, spec.head_dim // 2, mrope_layout)


def build_graph(decoder, weights: WeightFile, precision: Precision, max_context: int,
                linears: Linears, activations: Activations = Activations.FP32,
                mrope_layout: str = "gqa") -> tuple[Graph, TextSpec]:
    """The decoder Graph of `decoder` (edgevlm.export.graphs.Decoder, which holds the
    language model as `.text` and the head as `.lm_head`). `mrope_layout`: how an M-RoPE
    decoder applies its rotary (mrope.LAYOUTS)."""
    spec = text_spec(decoder.text_config)
    dtype, kv_type = FLOAT_TYPES[activations]
    g = Graph(weights)
    embeds, mask, past, present = _io(g, spec, kv_type)
    h = embeds
    if activations is not Activations.FP32:
        h = g.node("Cast", [h], "/model/inputs_embeds/Cast", to=kv_type)[0]
    lengths = attn.sequence_lengths(g, mask)
    rope = _rope(g, decoder, spec, max_context, dtype, mrope_layout)
    eps = spec.rms_eps
    residual, branch = h, None
    for i, layer in enumerate(decoder.text.layers):
        name = f"/model/layers.{i}"
        w = layer.input_layernorm.weight
        if branch is None:
            normed = rms_norm(g, h, f"{name}/input_layernorm", f"model.layers.{i}.input_layernorm"
                              ".weight", w, eps, dtype)
        else:
            normed, residual = skip_rms_norm(g, branch, residual, f"{name}/input_layernorm",
                                             f"model.layers.{i}.input_layernorm.weight", w, eps,
                                             dtype)
        out = attn.attention(g, i, normed, layer.self_attn, spec, linears, lengths, rope,
                             (past[2 * i], past[2 * i + 1]), (present[2 * i], present[2 * i + 1]))
        normed, residual = skip_rms_norm(g, out, residual, f"{name}/post_attention_layernorm",
                                         f"model.layers.{i}.post_attention_layernorm.weight",
                                         layer.post_attention_layernorm.weight, eps, dtype)
        branch = mlp(g, i, normed, layer.mlp, linears, spec)
    name = f"/model/layers.{spec.num_layers}/final_norm_layernorm"
    normed, _ = skip_rms_norm(g, branch, residual, name, "model.norm.weight",
                              decoder.text.norm.weight, eps, dtype)
    last = g.node("Gather", [normed, g.constant(-1)], "/model/last_position/Gather", axis=1)[0]
    logits = _lm_head(g, last, decoder.lm_head, linears)
    logits = g.node("Unsqueeze", [logits, g.constant([1])], "/lm_head/Unsqueeze",
                    outputs=["logits"] if activations is Activations.FP32 else None)[0]
    if activations is not Activations.FP32:
        g.node("Cast", [logits], "/lm_head/Cast", outputs=["logits"], to=TensorProto.FLOAT)
    return g, spec


def build_decoder(decoder, path: Path, precision: Precision, max_context: int, linears: Linears,
                  activations: Activations = Activations.FP32, opset: int = 17,
                  mrope_layout: str = "gqa") -> BuiltDecoder:
    """Write the decoder graph to `path` and its weights to `<path>_data`."""
    from edgevlm.export.onnx_io import data_file

    path.parent.mkdir(parents=True, exist_ok=True)
    weights = WeightFile(data_file(path))
    try:
        g, spec = build_graph(decoder, weights, precision, max_context, linears, activations,
                              mrope_layout)
    finally:
        weights.close()
    g.save(path, opset)
    quantized = linears.weights is not None
    block = (next(w for w in linears.weights.values() if not isinstance(w, list)).block_size
             if quantized else None)
    return BuiltDecoder(path, spec, precision, activations, max_context,
                        linears.accuracy_level if quantized else None, block, len(g.nodes))
