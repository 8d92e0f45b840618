"""Writing a traced graph's weights from the torch module, one tensor at a time.

The tracer is run with `export_params=False`: it writes the graph with every parameter as a
named input and no weights. Letting it write the weights itself costs about three extra copies
of them in memory (constant-folded transposes, the C++ protobuf, the serialized bytes), which is
what makes a 7B export need several times the model's size. Here each parameter is written from
the torch tensor straight into the graph file or into `<graph>.onnx_data`, so the export never
holds more than the model plus one tensor.

Initializers keep their Hugging Face parameter names (`text.layers.0.mlp.up_proj.weight`). A
Linear weight, which the graph only uses through Transpose(perm=[1,0]) -> MatMul, is stored
transposed, (in, out), and the Transpose is dropped: the MatMul then reads a constant weight,
which both onnxruntime quantizers need, and a quantized checkpoint can find its layers by name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import onnx
from onnx import helper

from edgevlm.export.onnx_io import EXTERNAL_DATA_BYTES, data_file

PROTOBUF_LIMIT = 2**31 - 1  # bytes: a graph file over this must keep its weights outside
_ALIGN = 1 << 16  # data offsets on 64 KiB so onnxruntime can memory-map tensors on any OS


def _is_transpose_2d(node) -> bool:
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return node.op_type == "Transpose" and perm == [[1, 0]]


def _fold_transposes(graph, tensors: dict) -> set[str]:
    """Drop every Transpose(perm=[1,0]) that is the only use of a 2-D weight and let its
    readers read the weight; returns the weights to store transposed."""
    users = defaultdict(list)
    for node in graph.node:
        for x in node.input:
            users[x].append(node)
    folded = {name for name, t in tensors.items() if t.dim() == 2 and users[name]
              and all(_is_transpose_2d(n) for n in users[name])}
    rename = {n.output[0]: name for name in folded for n in users[name]}
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in rename)]
    for node in kept:
        for i, x in enumerate(node.input):
            node.input[i] = rename.get(x, x)
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _tensor_proto(name: str, array) -> onnx.TensorProto:
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    proto.dims.extend(array.shape)
    return proto


def attach(path: Path, module, external: bool | None) -> bool:
    """Fill the weight inputs of the traced graph at `path` from `module`; True if external.

    `external=None` keeps the weights inline up to EXTERNAL_DATA_BYTES. Weights over protobuf's
    2 GB limit always go to `<graph>.onnx_data`.
    """
    model = onnx.load(str(path))  # no weights yet: a few MB at most
    graph = model.graph
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    tensors = {i.name: named[i.name].detach() for i in graph.input if i.name in named}
    unknown = [i.name for i in graph.input if i.name.startswith("onnx::")]
    assert not unknown, f"traced graph has unnamed tensor inputs {unknown[:3]}"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if external is None:
        external = total > EXTERNAL_DATA_BYTES
    external = external or total > PROTOBUF_LIMIT
    folded = _fold_transposes(graph, tensors)

    sink = open(data_file(path), "wb") if external else None
    try:
        for name, t in tensors.items():
            array = (t.t() if name in folded else t).contiguous().cpu().numpy()  # one tensor
            proto = _tensor_proto(name, array)
            if sink is None:
                proto.raw_data = array.tobytes()
            else:
                if array.nbytes >= _ALIGN:
                    sink.seek(-sink.tell() % _ALIGN, 1)
                offset = sink.tell()
                array.tofile(sink)
                proto.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_file(path).name), ("offset", str(offset)),
                                   ("length", str(array.nbytes))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = key, value
            graph.initializer.append(proto)
    finally:
        if sink is not None:
            sink.close()
    kept = [i for i in graph.input if i.name not in tensors]
    del graph.input[:]
    graph.input.extend(kept)
    onnx.save_model(model, str(path))
    return external
