"""ONNX files by the contract: trace a wrapper's graph, keep weights in one external-data file.

Names and dynamic axes come from edgevlm.runtime.contract (STYLE rule 9), never from here. A
graph whose weights pass EXTERNAL_DATA_BYTES keeps them in `<graph>.onnx_data` beside it, the
name transformers.js and onnxruntime-genai use; protobuf cannot hold a file over 2 GB, and a
separate data file lets a runtime memory-map the weights. The weights themselves are written by
edgevlm.export.weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo

from edgevlm.runtime.contract import GraphIO

EXTERNAL_DATA_BYTES = 1 << 30  # 1 GB: well under protobuf's 2 GB hard limit


def data_file(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + "_data")


def trace_to_onnx(module, args: tuple, path: Path, io: GraphIO, opset: int,
                  static: bool = False) -> None:
    """The graph of `module`, weights left as named inputs (edgevlm.export.weights fills them).

    The TorchScript tracer (dynamo=False) handles transformers' DynamicCache and the contract's
    dynamic axes (batch, sequence, past length 0..n) robustly. Constant folding is off because
    it would copy every Linear weight; onnxruntime folds the remaining shape arithmetic when it
    loads the graph. The tracer's warnings are about Python values it freezes (config sizes),
    which is what we want, so they are silenced. `static` fixes every axis at the size of
    `args` (the mobile profile).
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(io.inputs),
                          output_names=list(io.outputs),
                          dynamic_axes={} if static else io.dynamic_axes(),
                          opset_version=opset, export_params=False, do_constant_folding=False,
                          keep_initializers_as_inputs=True, dynamo=False)


def graph_bytes(path: Path) -> int:
    """Size of a graph on disk: the .onnx file plus its `<graph>.onnx_data`, if any."""
    data = data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def gather_external_data(path: Path) -> None:
    """Move a graph's external tensors, wherever they are, into one `<graph>.onnx_data`.

    onnxruntime's quantizers write `<graph>.onnx.data`; this streams tensor by tensor, so it
    never holds the whole model in memory.
    """
    model = onnx.load(str(path), load_external_data=False)
    target = data_file(path)
    partial = target.with_name(target.name + ".partial")
    old_files = set()
    with open(partial, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = ExternalDataInfo(tensor)
            src = path.parent / info.location
            old_files.add(src)
            with open(src, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", target.name), ("offset", str(offset)),
                               ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    for f in old_files:
        f.unlink()
    os.replace(partial, target)
    onnx.save_model(model, str(path))


def check(path: Path, ort_ops: bool = False) -> None:
    """onnx.checker by path, so graphs with external data (and over 2 GB) are checked too.
    `ort_ops`: the graph uses onnxruntime's own ops in the default domain (the builder's
    SimplifiedLayerNormalization), which onnx.checker rejects; onnxruntime loading it, without
    optimizations, checks every node against its schema instead."""
    if not ort_ops:
        onnx.checker.check_model(str(path))
        return
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fold_constants(path: Path, external: bool) -> None:
    """Rewrite the graph at `path` as onnxruntime's basic-level optimizer leaves it: constant
    shape arithmetic (Unsqueeze/Concat/ConstantOfShape of constants) folded into initializers,
    no fused or device-specific ops. A static graph then holds only the ops it computes with,
    which is what ORT Mobile and the readiness checker see after loading it anyway."""
    import onnxruntime as ort

    folded = path.with_name(path.stem + ".folded.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    opts.log_severity_level = 3
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      data_file(folded).name)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    folded.unlink()
    data_file(folded).unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file(path).name)
