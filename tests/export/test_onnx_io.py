"""Weights written one tensor at a time, inline or in one `<graph>.onnx_data`."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgevlm.export import onnx_io, weights
from edgevlm.runtime.contract import GraphIO


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4, bias=False)
        self.scale = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.scale


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True])
def test_attach_writes_named_weights(tmp_path, external):
    torch.manual_seed(0)
    block = _Block().eval()
    path = tmp_path / "g.onnx"
    # 3-D activations, as in the models: the tracer writes Linear as Transpose(W) -> MatMul.
    io = GraphIO(inputs={"x": ("batch", "seq", 8)}, outputs={"y": ("batch", "seq", 4)})
    onnx_io.trace_to_onnx(block, (torch.randn(2, 3, 8),), path, io, 17)
    assert weights.attach(path, block, external) is external
    graph = onnx.load(str(path)).graph  # loads the external data too
    assert [i.name for i in graph.input] == ["x"]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert set(inits) == {"up.weight", "up.bias", "down.weight", "scale"}
    # Linear weights are stored (in, out) for MatMul, and no Transpose is left.
    np.testing.assert_array_equal(inits["up.weight"], block.up.weight.detach().numpy().T)
    assert "Transpose" not in {n.op_type for n in graph.node}
    onnx_io.check(path)
    x = np.random.default_rng(0).standard_normal((1, 5, 8)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(path, x), want, atol=1e-6)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == (["g.onnx", "g.onnx_data"] if external else ["g.onnx"])


def test_gather_external_data(tmp_path):
    """Tensors spread over several files (onnxruntime's quantizers, one file per tensor) end up
    in the single <graph>.onnx_data."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    path = tmp_path / "decoder.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3
    before = _run(path, x)
    onnx_io.gather_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx_data"]
    onnx_io.check(path)
    # The same weights: a bit-identical output. (Against numpy only to float rounding: the CPU's
    # MatMul kernel sums in its own order, AVX2 and AVX-512 differently.)
    np.testing.assert_array_equal(_run(path, x), before)
    np.testing.assert_allclose(before, x @ numpy_helper.to_array(w1)
                               @ numpy_helper.to_array(w2), rtol=1e-5, atol=1e-5)
    assert onnx_io.graph_bytes(path) == sum(p.stat().st_size for p in tmp_path.iterdir())
