"""The int4 seam: integer weights, scales and zero points in, a MatMulNBits node out."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgevlm.export.int4 import Int4Weight, matmul_nbits


def _rtn(w: np.ndarray, block: int) -> Int4Weight:
    """Asymmetric round-to-nearest per block of `block` input channels (test helper)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = ((hi - lo) / 15).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(blocks / scale[..., None] + zp[..., None]), 0, 15)
    return Int4Weight(q.reshape(n, k).astype(np.uint8), scale, zp.astype(np.uint8), block)


@pytest.mark.parametrize("k,n,block", [(64, 48, 32), (96, 40, 32), (128, 16, 64)])
def test_matmul_nbits_equals_dequantized_matmul(k, n, block):
    rng = np.random.default_rng(0)
    weight = _rtn(rng.standard_normal((n, k)).astype(np.float32), block)
    node, inits = matmul_nbits(weight, "x", "y", "layer")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    blocks = k // block
    dequant = ((weight.q.reshape(n, blocks, block).astype(np.float32)
                - weight.zero_points[..., None]) * weight.scales[..., None]).reshape(n, k)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ dequant.T, atol=1e-4)


def test_int4_weight_checks_shapes():
    q = np.zeros((4, 64), np.uint8)
    with pytest.raises(AssertionError, match="scales"):
        Int4Weight(q, np.ones((4, 3), np.float32), np.zeros((4, 2), np.uint8), 32)
