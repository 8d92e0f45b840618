"""4-bit weights in ONNX: onnxruntime's MatMulNBits (and GatherBlockQuantized for embeddings).

Two sources of the 4-bit numbers:
  * "rtn": a plain model; onnxruntime's MatMulNBitsQuantizer rounds each block of `block_size`
    input channels to nearest with a scale and zero point (asymmetric RTN).
  * "checkpoint": a model already quantized by `edgevlm quantize` (GPTQ, Q-VLM ...), whose
    integer weights, scales and zero points must reach the graph unchanged. `matmul_nbits`
    below is that seam: it takes one layer's integers and returns the MatMulNBits node and
    initializers. The float graph's MatMul weights carry their Hugging Face parameter names
    (edgevlm.export.weights), so `replace_matmuls` finds each layer's MatMul by name; layers
    the checkpoint left in float (lm_head, say) are then rounded as in "rtn".
MatMulNBits layout (onnxruntime contrib op spec): B is uint8 (N, K/block, block/2) with two
4-bit values per byte, low nibble first; scales (N * K/block); zero points packed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.errors import UserError

MIN_BLOCK = 16  # MatMulNBits needs a power of two >= 16


def check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        raise UserError(f"block_size {block_size} is not supported; MatMulNBits needs a power of "
                        f"two of at least {MIN_BLOCK} (e.g. 32, 64, 128)")


def check_widths(widths: dict[str, int], block_size: int, component: str) -> None:
    """Every quantized layer's input width must be a whole number of blocks."""
    bad = {name: w for name, w in widths.items() if w % block_size}
    if bad:
        name, width = next(iter(bad.items()))
        fits = [b for b in (16, 32, 64, 128, 256) if all(w % b == 0 for w in widths.values())]
        hint = f"use --block-size {max(fits)}" if fits else "export this component as int8"
        raise UserError(f"{component}: block_size {block_size} does not divide the input width "
                        f"{width} of {name} ({len(bad)} layer(s) affected); {hint}")


def rtn(src: Path, dst: Path, block_size: int, ops: tuple[str, ...], external: bool,
        checkpoint: dict[str, Int4Weight] | None = None) -> None:
    """Round-to-nearest 4-bit quantization of a float graph's MatMul/Gather weights.

    `checkpoint` maps weight initializer names to a quantized checkpoint's integers: those
    MatMuls become MatMulNBits from the integers as they are, and only the rest are rounded.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))  # external data resolves relative to src
    if checkpoint:
        replace_matmuls(model.graph, checkpoint)
        if all(o.domain != "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                     op_types_to_quantize=ops)
    # An all-zero block (the padding row of an embedding) has scale 0; the quantizer divides by
    # it and then picks the right value with np.where, so the 0/0 warning is noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)


@dataclass(frozen=True)
class Int4Weight:
    """One linear layer y = x @ W.T quantized in blocks along its input dimension K.

    W ≈ (q - zero_point) * scale per block, the dequantization of edgevlm.quant.primitives.
    """

    q: np.ndarray  # (N, K) integers in [0, 15]
    scales: np.ndarray  # (N, K // block_size) float32
    zero_points: np.ndarray  # (N, K // block_size) integers in [0, 15]
    block_size: int

    def __post_init__(self):
        n, k = self.q.shape
        blocks = (n, k // self.block_size)
        assert k % self.block_size == 0, f"K={k} is not a multiple of block {self.block_size}"
        assert self.scales.shape == blocks, f"scales {self.scales.shape} != {blocks}"
        assert self.zero_points.shape == blocks, f"zero points {self.zero_points.shape} != {blocks}"
        assert self.q.min() >= 0 and self.q.max() <= 15, "q must be 4-bit unsigned"


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """(..., 2m) ints in [0,15] -> (..., m) uint8, element 2i in the low nibble."""
    v = values.astype(np.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def matmul_nbits(weight: Int4Weight, x: str, y: str, prefix: str):
    """A MatMulNBits node computing y = x @ W.T and its three initializers."""
    from onnx import helper, numpy_helper

    n, k = weight.q.shape
    blocks = k // weight.block_size
    packed = _pack_nibbles(weight.q.reshape(n, blocks, weight.block_size))  # (N, blocks, bs/2)
    zp = weight.zero_points
    if blocks % 2:  # zero points pack per row of N, padded to whole bytes
        zp = np.concatenate([zp, np.zeros((n, 1), zp.dtype)], axis=1)
    inits = [numpy_helper.from_array(packed, f"{prefix}.qweight"),
             numpy_helper.from_array(weight.scales.astype(np.float32).reshape(-1),
                                     f"{prefix}.scales"),
             numpy_helper.from_array(_pack_nibbles(zp).reshape(-1), f"{prefix}.zero_points")]
    node = helper.make_node("MatMulNBits", [x] + [t.name for t in inits], [y],
                            name=f"{prefix}.MatMulNBits", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=weight.block_size)
    return node, inits


def replace_matmuls(graph, weights: dict[str, Int4Weight]) -> None:
    """Turn every MatMul(x, W) whose W is an initializer named in `weights` into MatMulNBits
    from those integers, in place, and drop the float W. Entries the graph has no weight for
    are layers that do not reach its outputs (SigLIP's pooling head) and are ignored."""
    inits = {t.name: t for t in graph.initializer}
    nodes, done = [], set()
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w not in weights:
            nodes.append(node)
            continue
        dims = tuple(inits[w].dims)  # (K, N): the tracer's weights are stored transposed
        assert dims == weights[w].q.shape[::-1], f"{w}: graph {dims} vs checkpoint (N, K) " \
            f"{weights[w].q.shape}"
        new, tensors = matmul_nbits(weights[w], node.input[0], node.output[0],
                                    w.removesuffix(".weight"))
        nodes.append(new)
        graph.initializer.extend(tensors)
        done.add(w)
    missing = (set(weights) & set(inits)) - done
    assert not missing, f"checkpoint weights not read by a MatMul: {sorted(missing)[:3]}"
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(kept)
