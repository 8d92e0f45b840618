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
MatMulNBits layout (onnxruntime contrib op spec): K is padded to whole blocks, B is uint8
(N, ceil(K/block), block/2) with two 4-bit values per byte, low nibble first; scales
(N * ceil(K/block)); zero points packed the same way. So a block size that does not divide K is
a ragged last block holding K mod block columns, the layout of edgevlm.quant.primitives' ragged
last group; its padding is written as the block's zero point, so it dequantizes to 0. The
"rtn" path gets the same from MatMulNBitsQuantizer, which pads the float weight with zeros to
whole blocks before rounding (and GatherBlockQuantized takes ceil(D/block) scales per row).
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
    scales: np.ndarray  # (N, ceil(K / block_size)) float32; the last block may be ragged
    zero_points: np.ndarray  # (N, ceil(K / block_size)) integers in [0, 15]
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.q.shape[1] // self.block_size)

    def __post_init__(self):
        n, k = self.q.shape
        blocks = (n, self.blocks)
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
    blocks, bs = weight.blocks, weight.block_size
    q = weight.q
    if blocks * bs > k:  # a ragged last block: pad with its zero point, (q - z)·s = 0 there
        pad = np.repeat(weight.zero_points[:, -1:], blocks * bs - k, axis=1)
        q = np.concatenate([q, pad.astype(q.dtype)], axis=1)
    packed = _pack_nibbles(q.reshape(n, blocks, bs))  # (N, blocks, bs/2)
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
