"""The int4 seam: integer weights, scales and zero points in, a MatMulNBits node out; ragged
last blocks (a block size that does not divide K) included."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def _session(weight: Int4Weight):
    n, k = weight.q.shape
    node, inits = matmul_nbits(weight, "x", "y", "layer")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, {t.name: numpy_helper.to_array(t) for t in inits}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("k,block", [(96, 64), (576, 128), (80, 32), (40, 64)])
def test_ragged_last_block_carries_the_searched_integers(method, k, block):
    """The primitives' ragged last group (K mod block columns, own scale and zero point) goes
    into MatMulNBits as it is: blob (N, ceil(K/block), block/2), the padding nibbles hold the
    block's zero point, and the node computes x @ ((q − z)·s)ᵀ to float rounding."""
    import torch

    from edgevlm.quant import GptqConfig, gptq, rtn
    from edgevlm.quant.primitives import QuantConfig

    torch.manual_seed(0)
    n = 24
    W = torch.randn(n, k)
    cfg = QuantConfig(method=method, group_size=block,
                      gptq=GptqConfig(gptq_block=max(128, block)))
    X = torch.randn(512, k)
    qw = (rtn.quantize_weight(W, cfg) if method == "rtn"
          else gptq.quantize_weight(W, gptq.hessian(X), cfg))
    blocks = -(-k // block)
    assert qw.scale.shape == (n, blocks) and qw.ragged
    weight = Int4Weight(qw.q.numpy().astype(np.uint8), qw.scale.numpy(),
                        qw.zero_point.numpy().astype(np.uint8), block)
    sess, inits = _session(weight)
    blob = inits["layer.qweight"]
    assert blob.shape == (n, blocks, block // 2) and inits["layer.scales"].shape == (n * blocks,)
    nibbles = np.stack([blob & 0xF, blob >> 4], axis=-1).reshape(n, blocks * block)
    np.testing.assert_array_equal(nibbles[:, :k], weight.q)
    pad = blocks * block - k
    np.testing.assert_array_equal(nibbles[:, k:], np.repeat(weight.zero_points[:, -1:], pad, 1))
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    want = x @ qw.dequantize().numpy().T
    got = sess.run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max() * np.sqrt(k), \
        np.abs(got - want).max()


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
