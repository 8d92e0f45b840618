"""How each precision is made from the traced float graph, in one readable place.

  fp32  the traced graph as is.
  fp16  traced from the model in half precision (torch keeps RoPE and RMSNorm statistics in
        float32, which a blind graph-level float16 cast would not); IO stays float32.
  int8  onnxruntime quantize_dynamic: 8-bit weights per output channel, stored as uint8 (the u8·s8
        kernel saturates on AVX2 CPUs; edgevlm.export.int8), activations quantized on the fly
        (MatMulInteger); embedding tables as int8 Gather. The layers of an 8-bit checkpoint, and
        every Linear of the vision encoder (edgevlm.export.vision_int8), then get edgevlm's
        integers and scales (edgevlm.export.int8).
  int4  MatMulNBits with 4-bit weights in blocks of `block_size` input channels (edgevlm.export
        .int4), GatherBlockQuantized for embedding tables; the layers of a quantized checkpoint
        keep its integers, the rest are rounded to nearest.
Convolutions (the vision patch embedding) stay float: onnxruntime's CPU ConvInteger takes only
uint8, and the layer is a tiny share of the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path

from edgevlm.export import int4, int8
from edgevlm.runtime.contract import Precision

log = logging.getLogger(__name__)

# The weight-carrying op each component quantizes: the embedding is one Gather, the others
# are Linear layers, which the tracer writes as MatMul.
QUANT_OPS = {"vision_encoder": ("MatMul",), "embed_tokens": ("Gather",),
             "decoder_model_merged": ("MatMul",)}


def quantize(component: str, precision: str, src: Path, dst: Path, block_size: int,
             external: bool,
             checkpoint: dict[str, int4.Int4Weight | int8.Int8Weight] | None = None) -> None:
    """Write `dst`, the int8 or int4 version of the fp32 graph `src`; the layers in `checkpoint`
    (weight name -> integers of the same precision) keep them as they are, the rest are rounded
    to nearest."""
    ops = QUANT_OPS[component]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        _quantize(component, precision, src, dst, block_size, external, ops, checkpoint)


def _quantize(component, precision, src, dst, block_size, external, ops, checkpoint) -> None:
    if Precision(precision) is Precision.INT8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with warnings.catch_warnings():
            # quantize_dynamic advises running its pre-processing; the traced graph already has
            # shapes inferred and constants folded.
            warnings.simplefilter("ignore")
            gather = component == "embed_tokens"  # a lookup: no u8·s8 products to saturate
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(ops),
                             per_channel=not gather,
                             weight_type=QuantType.QInt8 if gather else QuantType.QUInt8,
                             use_external_data_format=external)
        if checkpoint:
            int8.use_checkpoint(dst, checkpoint, external)
    elif Precision(precision) is Precision.INT4:
        int4.rtn(src, dst, block_size, ops, external, checkpoint)
    else:
        raise AssertionError(f"{precision} is not made by quantizing a float graph")


def float_weights(path: Path) -> tuple[str, ...]:
    """Weights a quantized graph still multiplies or looks up in float (e.g. the vision patch
    Conv), so the report says what was not quantized."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    used = {x for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Gather")
            for x in n.input}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    return tuple(t.name for t in graph.initializer
                 if t.name in used and t.data_type in floats and math.prod(t.dims) >= 4096)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs through the root logger and, on import, configures it at
    INFO (logging.basicConfig), which would switch on INFO output for the whole process. Hold a
    handler so basicConfig does nothing, show errors only, and restore the logger after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
