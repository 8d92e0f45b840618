"""M-RoPE (Qwen2-VL, Qwen2.5-VL) in the built decoder: the `position_ids` input and the rotary
inputs every layer's attention reads (spec.py says what M-RoPE is).

The graph takes position_ids (3, B, S) int64: the temporal, height and width position of each
token, as transformers' Qwen2VLTextModel takes them. Frequency j of the head_dim / 2 takes its
angle from stream `stream[j]` (run i of mrope_section reads stream i % 3), so the merged
cos/sin of one token are gathered rows of the ordinary cos/sin caches, once per pass:

    position_ids (3, B, S) ─► Gather(cos_cache) (3, B, S, hd/2) ─► Split(mrope_section, axis -1)
        ─► run i: Gather(axis 0, index i % 3) (B, S, section_i) ─► Concat ─► merged (B, S, hd/2)
    (the same for sin; a text token, whose three streams are equal, gets the ordinary row)

Two layouts feed every layer from there (benchmarks/results/mrope_layout.md measured them):

  "gqa" (the default): the merged rows, one per token, followed by the whole cache, are the
      cos/sin tables of GroupQueryAttention's own rotary (do_rotary=1), and its position_ids
      input (B, S) = b·S + s points each token at its row; the layer is the same one fused op as
      a Llama's. The cache behind the rows only pads the table to the total_sequence_length
      rows GroupQueryAttention asks of it.
  "rotary": q and k split from the packed projection and rotated by one RotaryEmbedding each
      (position_ids b·S + s into the merged rows), then GroupQueryAttention with do_rotary=0.

GroupQueryAttention reads one start per batch row from its position_ids, and onnxruntime's CPU
kernel (1.32) takes row 0's start for every row of a multi-row prefill; the runtime and
onnxruntime-genai run batch 1, where "gqa" is exact. "rotary" indexes every token and is exact at
any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edgevlm.export.builder.graph import MS_DOMAIN, Graph

POSITION_IDS = "position_ids"  # (3, batch_size, sequence_length) int64
POSITION_AXES = (3, "batch_size", "sequence_length")
LAYOUTS = ("gqa", "rotary")
NAME = "/model/mrope"


@dataclass(frozen=True)
class Rope:
    """The rotary inputs of every layer's attention.

    cos, sin: the (R, hd/2) tables (R >= the positions read). positions: a (B, S) int64 input of
    GroupQueryAttention or RotaryEmbedding; "" when GroupQueryAttention derives the positions
    from seqlens_k (an ordinary RoPE decoder). apply: "gqa" rotates inside GroupQueryAttention;
    "rotary" rotates q and k with RotaryEmbedding before it."""

    cos: str
    sin: str
    positions: str = ""
    apply: str = "gqa"


def position_input(g: Graph) -> str:
    g.input(POSITION_IDS, TensorProto.INT64, POSITION_AXES)
    return POSITION_IDS


def _merge(g: Graph, cache: str, positions: str, section: tuple[int, ...], tag: str) -> str:
    """(3, B, S) positions -> (B, S, hd/2): each frequency's row from its own stream."""
    name = f"{NAME}/{tag}"
    rows = g.node("Gather", [cache, positions], f"{name}/Gather", axis=0)[0]  # (3, B, S, hd/2)
    runs = g.node("Split", [rows, g.constant(list(section))], f"{name}/Split",
                  n_out=len(section), axis=-1)
    picked = [g.node("Gather", [run, g.constant(i % 3)], f"{name}/Gather_{i}", axis=0)[0]
              for i, run in enumerate(runs)]  # each (B, S, section_i)
    return g.node("Concat", picked, f"{name}/Concat", axis=-1)[0]


def _token_rows(g: Graph, positions: str) -> str:
    """(B, S) int64 b·S + s: each token's row in a table of B·S merged rows."""
    text = g.node("Gather", [positions, g.constant(0)], f"{NAME}/rows/Gather", axis=0)[0]
    count = g.node("Size", [text], f"{NAME}/rows/Size")[0]
    flat = g.node("Range", [g.constant(0), count, g.constant(1)], f"{NAME}/rows/Range")[0]
    shape = g.node("Shape", [text], f"{NAME}/rows/Shape")[0]
    return g.node("Reshape", [flat, shape], f"{NAME}/rows/Reshape")[0]


def rope(g: Graph, caches: tuple[str, str], section: tuple[int, ...], half: int,
         layout: str = "gqa") -> Rope:
    """The position_ids input and, from it, the merged tables every layer reads."""
    assert layout in LAYOUTS, f"M-RoPE layout {layout!r} is not one of {LAYOUTS}"
    positions = position_input(g)
    tables = []
    for cache, tag in zip(caches, ("cos", "sin"), strict=True):
        merged = _merge(g, cache, positions, section, tag)
        flat = g.node("Reshape", [merged, g.constant([-1, half])], f"{NAME}/{tag}/Reshape")[0]
        if layout == "gqa":  # GroupQueryAttention wants at least total_sequence_length rows
            flat = g.node("Concat", [flat, cache], f"{NAME}/{tag}/Pad/Concat", axis=0)[0]
        tables.append(flat)
    return Rope(*tables, positions=_token_rows(g, positions), apply=layout)


def rotate_qk(g: Graph, name: str, qkv: str, spec, rope_in: Rope) -> list[str]:
    """[q, k, v] for GroupQueryAttention(do_rotary=0): the packed projection split, q and k
    rotated (rotate-half layout) by RotaryEmbedding at the merged rows."""
    hd = spec.head_dim
    sizes = [spec.num_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd]
    q, k, v = g.node("Split", [qkv, g.constant(sizes)], f"{name}/qkv/Split", n_out=3, axis=-1)
    rotated = [g.node("RotaryEmbedding", [x, rope_in.positions, rope_in.cos, rope_in.sin],
                      f"{name}/{tag}_rotary/RotaryEmbedding", domain=MS_DOMAIN, interleaved=0)[0]
               for x, tag in ((q, "q"), (k, "k"))]
    return [*rotated, v]


def text_positions(start: int, length: int, batch: int = 1) -> np.ndarray:
    """(3, batch, length) int64 position_ids of text tokens at start.. (the three streams equal)."""
    row = np.arange(start, start + length, dtype=np.int64)
    return np.broadcast_to(row, (3, batch, length)).copy()
