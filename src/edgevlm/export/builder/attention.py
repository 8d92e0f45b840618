"""Self-attention as one GroupQueryAttention per layer, rotary and KV cache inside.

The sequence lengths GroupQueryAttention needs are computed once per pass from the attention
mask, as onnxruntime-genai's graphs do, so the same graph runs under genai:

    attention_mask (B, T) int64
      ├─ ReduceSum(axis 1) ─ Sub 1 ─ Cast int32 ──► seqlens_k (B,): index of each row's last token
      └─ Shape ─ Gather 1 ─ Cast int32 ──────────► total_sequence_length (): T

Per layer (q, k and v read the same input, so they are one packed MatMul):

    normed (B, S, D)
      │
      qkv_proj MatMul[NBits] (+ bias Add: Qwen2)          (B, S, (H + 2·H_kv)·hd)
      │
      GroupQueryAttention(num_heads H, kv_num_heads H_kv, do_rotary=1, cos_cache, sin_cache,
      │                   seqlens_k, total_sequence_length, past_key, past_value)
      │   ├─► present_key, present_value  (B, H_kv, L, hd): the same buffers as past when the
      │   │   caller binds them so (past_present_share_buffer): this step's keys and values are
      │   │   written at positions seqlens_k - S + 1 .. seqlens_k, nothing is copied
      │   └─ rotary positions: the same positions, so no position_ids input
      o_proj MatMul[NBits]                                (B, S, D)

M-RoPE decoders (mrope.py) keep this layer and change only what GroupQueryAttention's rotary
reads: per-token merged cos/sin rows and a position_ids input pointing at them ("gqa"), or q and
k split and rotated by RotaryEmbedding before it, with do_rotary=0 ("rotary").
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgevlm.export.builder.graph import MS_DOMAIN, Graph
from edgevlm.export.builder.mrope import Rope, rotate_qk

MASK_NAME = "/model/attn_mask_reformat/attn_mask_subgraph"


def sequence_lengths(g: Graph, attention_mask: str) -> tuple[str, str]:
    """(seqlens_k, total_sequence_length) from the (B, T) attention mask."""
    one = g.constant([1])
    total = g.node("ReduceSum", [attention_mask, one], f"{MASK_NAME}/ReduceSum", keepdims=0)[0]
    last = g.node("Sub", [total, g.constant(1)], f"{MASK_NAME}/Sub")[0]
    seqlens = g.node("Cast", [last], f"{MASK_NAME}/Sub/Cast", to=TensorProto.INT32)[0]
    shape = g.node("Shape", [attention_mask], f"{MASK_NAME}/Shape")[0]
    length = g.node("Gather", [shape, g.constant(1)], f"{MASK_NAME}/Gather", axis=0)[0]
    total_len = g.node("Cast", [length], f"{MASK_NAME}/Gather/Cast", to=TensorProto.INT32)[0]
    return seqlens, total_len


def rotary(g: Graph, cos: np.ndarray, sin: np.ndarray, dtype) -> tuple[str, str]:
    """The cos/sin cache initializers (what every layer's GroupQueryAttention reads, for an
    ordinary RoPE decoder)."""
    return g.weight("cos_cache", cos.astype(dtype)), g.weight("sin_cache", sin.astype(dtype))


def attention(g: Graph, layer: int, x: str, attn, spec, linears, lengths: tuple[str, str],
              rope: Rope, past: tuple[str, str], present: tuple[str, str]) -> str:
    """One layer's attention block from `attn` (a transformers LlamaAttention /
    Qwen2Attention / Qwen2VLAttention); returns the o_proj output (B, S, D)."""
    name = f"/model/layers.{layer}/attn"
    key = f"text.layers.{layer}.self_attn"
    qkv = linears(g, x, f"{name}/qkv_proj", f"model.layers.{layer}.attn.qkv_proj",
                  [(f"{key}.{p}.weight", getattr(attn, p)) for p in ("q_proj", "k_proj",
                                                                      "v_proj")])
    if rope.apply == "rotary":
        inputs = [*rotate_qk(g, name, qkv, spec, rope), past[0], past[1], *lengths]
    else:
        inputs = [qkv, "", "", past[0], past[1], *lengths, rope.cos, rope.sin]
        inputs += [rope.positions] if rope.positions else []
    out = g.node("GroupQueryAttention", inputs, f"{name}/GroupQueryAttention",
                 outputs=[f"{name}/GroupQueryAttention/output_0", *present], domain=MS_DOMAIN,
                 num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
                 scale=float(spec.head_dim ** -0.5), do_rotary=int(rope.apply == "gqa"),
                 rotary_interleaved=0, local_window_size=-1)[0]
    return linears(g, out, f"{name}/o_proj", f"model.layers.{layer}.attn.o_proj",
                   [(f"{key}.o_proj.weight", attn.o_proj)])
