"""One ONNX graph being written: nodes with predictable names, weights streamed to disk.

Every node is named by where it sits in the model (`/model/layers.3/attn/GroupQueryAttention`)
and its outputs are `<node name>/output_<i>`, the convention of onnxruntime-genai's builder, so a
profile, a diff of two exports or a test can point at one op by name. Weights go straight from
the array that made them into `<graph>.onnx_data` (64 KiB aligned, so onnxruntime can
memory-map them), so the builder holds one layer's tensors at a time. A tensor whose bytes were
already written (a tied embedding table read by two graphs, say) points at the same bytes
instead of writing them twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MS_DOMAIN = "com.microsoft"
_ALIGN = 1 << 16  # bytes; data offsets of large tensors

ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8}


class WeightFile:
    """The external-data file of one or more graphs: append-only, each distinct byte string
    stored once."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self._file = open(path, "ab" if append else "wb")
        self._seen: dict[bytes, tuple[int, int]] = {}

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """A TensorProto named `name` whose data lives in this file."""
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        key = hashlib.sha1(blob).digest() + str(len(blob)).encode()
        if key not in self._seen:
            if len(blob) >= _ALIGN:  # pad to the boundary (seek does not move an append)
                self._file.write(b"\0" * (-self._file.tell() % _ALIGN))
            self._seen[key] = (self._file.tell(), len(blob))
            self._file.write(blob)
        offset, length = self._seen[key]
        proto = TensorProto()
        proto.name = name
        proto.data_type = ONNX_TYPES[array.dtype]
        proto.dims.extend(array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(offset)),
                     ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        return proto

    def close(self) -> None:
        self._file.close()


class Graph:
    """Nodes, initializers and IO of one graph; `save` writes the .onnx file."""

    def __init__(self, weights: WeightFile, name: str = "edgevlm-decoder"):
        self.name = name
        self.weights = weights
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: set[str] = set()
        self._constants: dict[tuple, str] = {}

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1,
             outputs: list[str] | None = None, domain: str = "", **attrs) -> list[str]:
        """Add one node; returns its output names (`<name>/output_<i>` unless given)."""
        assert name not in self._names, f"node name {name} used twice"
        self._names.add(name)
        outputs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain,
                                           **attrs))
        return outputs

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight initializer (external data); returns its name."""
        self.initializers.append(self.weights.tensor(name, array))
        return name

    def constant(self, value, dtype=np.int64) -> str:
        """A small constant initializer kept inside the .onnx file, shared by every reader:
        `/model/constants/INT64/[1]`."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"/model/constants/{TensorProto.DataType.Name(ONNX_TYPES[array.dtype])}/" \
                   f"{np.array2string(array, separator=',').replace(' ', '')}"
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, producer_name="edgevlm.export.builder",
                                  opset_imports=[helper.make_opsetid("", opset),
                                                 helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = min(model.ir_version, 10)  # what onnxruntime 1.20+ reads
        return model

    def save(self, path: Path, opset: int) -> None:
        onnx.save_model(self.model(opset), str(path))
