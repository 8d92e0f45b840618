"""8-bit weights in onnxruntime's int8 graph: a quantized checkpoint's, or edgevlm's own.

onnxruntime's quantize_dynamic (per channel) turns each MatMul(x, W) into
DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_quantized, x_zp, W_zero_point) -> Cast ->
Mul(x_scale · W_scale), with W_quantized (K, N), W_scale float32 (N,) and W_zero_point (N,)
(names: onnxruntime.quantization.quant_utils, TENSOR_NAME_QUANT_SUFFIX; checked on 1.32).

The weights are stored as uint8 with zero point 128, not int8 (edgevlm.export.precision asks
quantize_dynamic for QUInt8): x_q is uint8, and onnxruntime's u8·s8 kernel on x86 CPUs without
VNNI (AVX2) sums pairs of u8·s8 products in 16-bit integers with saturation (vpmaddubsw), so
wherever the activations and weights are both large the result is clipped. On an AVX2 machine
that moved a tiny tower's features by a quarter of their range, while AVX-512 VNNI machines
computed them exactly; u8·u8 has no such step and gives identical results on both. The
integers are the same: a stored u8 is the s8 value + 128, its zero point the s8 zero point + 128.

quantize_dynamic derives its own integers from the float W; `use_checkpoint` overwrites the
three initializers of every layer given with edgevlm's: a checkpoint's own 8-bit weights
(`edgevlm quantize --bits 8 --group-size -1 --symmetric`: scale 2·max|w| / 255, and after GPTQ's
error feedback a channel may not reach the ends of the range, so re-rounding would change both
scales and integers), or the vision encoder's (edgevlm.export.vision_int8), so the graph
multiplies by exactly W = (q − z)·s and torch can carry the same arithmetic. The activations stay
onnxruntime's dynamic uint8 quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Int8Weight:
    """One linear layer y = x @ W.T with W = (q − zero_point) · scale per output row."""

    q: np.ndarray  # (N, K) int8
    scale: np.ndarray  # (N,) float32
    zero_point: np.ndarray  # (N,) int8; zeros for a symmetric checkpoint

    def __post_init__(self):
        n = self.q.shape[0]
        assert self.q.dtype == np.int8, f"q must be int8, got {self.q.dtype}"
        assert self.scale.shape == (n,), f"scale {self.scale.shape} != ({n},)"
        assert self.zero_point.shape == (n,), f"zero point {self.zero_point.shape} != ({n},)"


def _initializers(weight: Int8Weight, name: str, unsigned: bool) -> dict[str, np.ndarray]:
    """quantize_dynamic's three initializers for the weight initializer `name`, from
    `weight`; W_quantized is stored (K, N), as the tracer stores W. `unsigned`: the graph holds
    uint8 weights (the s8 values + 128, the same integers)."""
    shift, dtype = (128, np.uint8) if unsigned else (0, np.int8)
    return {f"{name}_quantized": np.ascontiguousarray((weight.q.T.astype(np.int16) + shift)
                                                      .astype(dtype)),
            f"{name}_scale": weight.scale.astype(np.float32),
            f"{name}_zero_point": (weight.zero_point.astype(np.int16) + shift).astype(dtype)}


def replace_weights(graph, weights: dict[str, Int8Weight]) -> int:
    """Overwrite, in place, the int8 initializers quantize_dynamic made for each weight named in
    `weights`; returns how many layers were replaced. A name with neither a quantized nor a float
    initializer is a layer that does not reach the graph's outputs (SigLIP's pooling head)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    readers = {i: n.op_type for n in graph.node for i in n.input}
    done = 0
    for name, weight in weights.items():
        assert name not in inits, f"{name}: quantize_dynamic left this checkpoint weight in float"
        if f"{name}_quantized" not in inits:
            continue
        assert readers.get(f"{name}_quantized") == "MatMulInteger", \
            f"{name}_quantized is read by {readers.get(f'{name}_quantized')}, not MatMulInteger"
        unsigned = inits[f"{name}_quantized"].data_type == onnx.TensorProto.UINT8
        for init_name, value in _initializers(weight, name, unsigned).items():
            old = inits[init_name]
            assert tuple(old.dims) == value.shape and old.data_type == \
                numpy_helper.from_array(value).data_type, \
                f"{init_name}: graph {tuple(old.dims)} vs checkpoint {value.shape} {value.dtype}"
            old.CopyFrom(numpy_helper.from_array(value, init_name))
        done += 1
    return done


def use_checkpoint(path: Path, weights: dict[str, Int8Weight], external: bool) -> None:
    """Rewrite the int8 graph at `path` (quantize_dynamic's output) with the checkpoint's
    integers, scales and zero points."""
    import onnx

    model = onnx.load(str(path))  # external data is read into memory
    count = replace_weights(model.graph, weights)
    assert count, f"{path}: none of the {len(weights)} checkpoint layers is in the graph"
    data = path.with_name(path.name + ".data")  # quantize_dynamic's external data file
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=data.name)
