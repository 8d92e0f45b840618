"""Every file an export makes the runtime read lies inside the export folder.

An export names files in two places: edgevlm.json (each component's graph, the mobile rope
table) and each graph's external-data entries (TensorProto.external_data "location"). A crafted
export could point either at `../../etc/passwd`, an absolute path or a symlink that leads out,
and onnxruntime before 1.24 read such external data as weights (1.26 still reads a hard-linked
file). So edgevlm checks, before any session opens and whatever the onnxruntime: every path
resolves (symlinks followed) inside the export, no external-data location is absolute, and no
external-data file has a second hard link. pyproject asks for onnxruntime >= 1.27, whose own
checks cover traversal, absolute paths, symlinks and sparse tensors.

The graph is read without the onnx package (the runtime does not depend on it): a small walk of
the protobuf wire format that follows only the messages that can hold tensors (ModelProto.graph
and functions, GraphProto.node/initializer/sparse_initializer, NodeProto.attribute,
AttributeProto.t/g/tensors/graphs/sparse tensors, FunctionProto.node) and skips every other
field by its length, so a graph with inline weights is not copied. Field numbers are onnx.proto3's.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edgevlm.errors import UserError

# message -> {field number: message type of that (length-delimited) field}
_SCHEMA = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_MAX_DEPTH = 64


def read_varint(buf, i: int) -> tuple[int, int]:
    """A protobuf varint at `buf[i]`: (value, the index after it); a truncated one is a
    ValueError."""
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _walk(buf, start: int, end: int, kind: str, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("messages nested too deeply")
    fields = _SCHEMA.get(kind, {})
    key = value = None
    i = start
    while i < end:
        tag, i = read_varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = read_varint(buf, i)
            if i + length > end:
                raise ValueError("a field runs past its message")
            if kind == "entry" and number in (1, 2):
                text = bytes(buf[i: i + length]).decode("utf-8", "replace")
                key, value = (text, value) if number == 1 else (key, text)
            elif number in fields:
                _walk(buf, i, i + length, fields[number], out, depth + 1)
            i += length
        else:
            raise ValueError(f"wire type {wire}")
    if kind == "entry" and key == "location" and value is not None:
        out.append(value)


def external_data_locations(graph: Path) -> list[str]:
    """The external-data locations named anywhere in the ONNX file `graph`."""
    out: list[str] = []
    with open(graph, "rb") as f:
        if f.seek(0, 2) == 0:
            raise UserError(f"{graph} is empty; re-export")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                _walk(buf, 0, len(buf), "model", out, 0)
            except (ValueError, IndexError) as e:
                raise UserError(f"{graph} is not a readable ONNX file ({e}); re-export") from e
    return out


def _safe(path: Path) -> str:
    """The path as one line: a name from a crafted manifest may hold a newline."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path)[:300])


def check_inside(root: Path, path: Path, what: str) -> Path:
    """`path` (after following symlinks) lies inside `root`; returns it."""
    try:
        real_root = root.resolve()
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, ...
        raise UserError(f"{what} names a path that cannot be resolved ({e}); the export is "
                        "damaged: re-export it") from e
    if not real.is_relative_to(real_root):
        raise UserError(f"{what} points to {_safe(path)}, outside the export folder {root}; the "
                        "export is damaged or was made to read other files: re-export it")
    return path


def check_graph_files(root: Path, graph: Path) -> None:
    """The graph and every external-data file it names lie inside `root`."""
    check_inside(root, graph, f"graph {graph.name}")
    for location in external_data_locations(graph):
        if Path(location).is_absolute():
            raise UserError(f"graph {graph.name} names its external data by the absolute path "
                            f"{location}; the export is damaged or was made to read other "
                            "files: re-export it")
        data = check_inside(root, graph.parent / location, f"external data of graph {graph.name}")
        if data.is_file() and data.stat().st_nlink > 1:
            raise UserError(f"the external data {data.name} of graph {graph.name} is a hard link "
                            "(a file shared with another path, possibly outside the export); "
                            "copy the export without hard links (cp -r, not cp -al) or re-export")
