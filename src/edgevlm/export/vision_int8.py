"""The int8 vision encoder: edgevlm's own integers, the torch model that carries them, and the
accuracy budget that decides whether an automatic int8 tower ships.

The int8 graph (onnxruntime's quantize_dynamic, edgevlm.export.precision) multiplies
DynamicQuantizeLinear(x), uint8 per tensor, by the weight's integers with MatMulInteger. The
weights are not onnxruntime's own rounding: `weights` rounds every Linear of the encoder to 8
bits per output channel with edgevlm.quant.primitives (symmetric, the checkpoint rule), and
edgevlm.export.int8 writes those integers into the graph. So torch can carry exactly the same
arithmetic (`carried`): each Linear multiplies by (q − z)·s, and its input is quantized the way
DynamicQuantizeLinear quantizes it (ONNX spec: range widened to include 0, scale = range / 255,
zero point rounded, values rounded half to even and saturated to 0..255). The graph is then
checked as a built int4 decoder is (edgevlm.export.graph_check), the graph, not the rounding
(`check`):

  * gated: the graph with float activations (a copy in which each DynamicQuantizeLinear ->
    MatMulInteger -> Cast -> Mul chain becomes a float MatMul by (q − z)·s) against torch
    carrying the same integers with float activations: only summation order is left, so the
    tolerance is the decoder's fp32 graph tolerance;
  * gated: every MatMulInteger of the graph as shipped returns exactly the integer product of
    its own inputs (the kernel computes what its integers define: a saturating kernel fails);
  * reported: the graph as shipped against torch carrying integers and activation quantization.
    Not gated: the two compute each layer's input in float in a different order, and a value a
    rounding step apart lands on the other integer; in a deep tower those flips compound (2% of
    the largest feature on a random 12-layer SigLIP), however right the graph.
Its distance to the float tower is reported, and for an int8 tower the user did not ask for it
is the budget (`cost`, INT8_BUDGET) that keeps the tower in float when rounding costs too much.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.export.int8 import Int8Weight
from edgevlm.quant.primitives import choose_qparams, quantize

# An automatic int8 tower (`--precision int4` without --vision-precision) ships only if its image
# features stay within this relative L2 distance, ‖f_int8 − f_fp‖ / ‖f_fp‖, of the float
# tower's on the validation images; otherwise the encoder is exported in fp32 and the summary and
# edgevlm.json say why. Trained towers land far below it: W8A8 with per-tensor activations
# typically costs 1-3%; a tower whose activations carry outliers (random init, some real
# checkpoints) goes well past it, and its int8 features would move the answers.
INT8_BUDGET = 0.05
# The float-activation graph against torch carrying its integers, relative to the largest
# feature: both multiply by the same float weights in a different summation order (the built
# decoder's fp32 bound, edgevlm.export.graph_check.GRAPH_TOLERANCE).
CARRIED_TOLERANCE = 2e-5


def weights(module: nn.Module) -> dict[str, Int8Weight]:
    """{graph weight name: Int8Weight} for every Linear under `module` (an export wrapper, whose
    parameter names are the traced graph's initializer names): 8 bits per output channel,
    symmetric, scale 2·max|w| / 255 (the rule an 8-bit checkpoint of edgevlm quantize uses)."""
    out = {}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach().float()
        qp = choose_qparams(w, 8, -1, symmetric=True)
        q = quantize(w, qp) - qp.zero_point  # (N, K) in -128..127
        out[f"{name}.weight"] = Int8Weight(q.to(torch.int8).numpy(),
                                           qp.scale.reshape(-1).numpy().astype(np.float32),
                                           np.zeros(w.shape[0], np.int8))
    return out


def dynamic_quantize(x: torch.Tensor) -> torch.Tensor:
    """x as DynamicQuantizeLinear sees it, dequantized: uint8 per tensor (ONNX spec)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return torch.zeros_like(x)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


@contextlib.contextmanager
def carried(module: nn.Module, found: dict[str, Int8Weight], activations: bool = True):
    """Within the block, every Linear of `module` named in `found` multiplies by its integers'
    float value and, with `activations`, quantizes its input as the shipped graph does; the
    float weights come back after."""
    linears = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    saved, handles = {}, []
    try:
        for name, w in found.items():
            m = linears[name]
            saved[name] = m.weight.data
            deq = (torch.from_numpy(w.q.astype(np.float32))
                   - torch.from_numpy(w.zero_point.astype(np.float32))[:, None]) \
                * torch.from_numpy(w.scale)[:, None]
            m.weight.data = deq.to(m.weight.dtype)
            if activations:
                handles.append(m.register_forward_pre_hook(
                    lambda _m, args: (dynamic_quantize(args[0]), *args[1:])))
        yield module
    finally:
        for h in handles:
            h.remove()
        for name, data in saved.items():
            linears[name].weight.data = data


def features(module: nn.Module, pixels) -> np.ndarray:
    """The encoder wrapper's image features on `pixels`, with the graph's feeds. `pixels`: an
    array, or a patch graph's feeds (one dict per image, Qwen2-VL), features concatenated."""
    if isinstance(pixels, list):
        with torch.no_grad():
            return np.concatenate([module(*(torch.from_numpy(v) for v in f.values())).float()
                                   .numpy() for f in pixels])
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        if x.dim() == 5:  # tiled (idefics3): every tile full, as the runtime feeds the graph
            mask = torch.ones((*x.shape[:2], *x.shape[-2:]), dtype=torch.bool)
            return module(x, mask).float().numpy()
        return module(x).float().numpy()


@dataclass(frozen=True)
class Int8Cost:
    """What rounding the tower to int8 costs on the validation images."""

    relative_error: float  # ‖f_int8 − f_fp‖ / ‖f_fp‖, torch carrying the integers
    budget: float
    carried: np.ndarray  # torch carrying integers and activation quantization (reported)
    weights_only: np.ndarray  # torch carrying the integers, float activations (the gate)

    @property
    def within(self) -> bool:
        return self.relative_error <= self.budget

    def to_dict(self, kept: str, automatic: bool) -> dict:
        why = ("asked for (--vision-precision int8)" if not automatic else
               f"int8 features within {self.budget:.0%} of float" if self.within else
               f"int8 features {self.relative_error:.1%} from float, over the "
               f"{self.budget:.0%} budget: the tower stays fp32")
        return {"relative_error": self.relative_error, "budget": self.budget,
                "precision": kept, "automatic": automatic, "why": why}


def cost(module: nn.Module, found: dict[str, Int8Weight], pixels: np.ndarray) -> Int8Cost:
    """Float and int8-carried features of the encoder wrapper on `pixels`, and their distance."""
    fp = features(module, pixels).astype(np.float64)
    with carried(module, found):
        q = features(module, pixels)
    with carried(module, found, activations=False):
        w = features(module, pixels)
    err = float(np.linalg.norm(q - fp) / max(np.linalg.norm(fp), 1e-30))
    return Int8Cost(err, INT8_BUDGET, q, w)


@dataclass(frozen=True)
class VisionCheck:
    """The int8 vision graph against torch carrying its integers (see the module docstring)."""

    max_abs: float  # float-activation graph vs torch, weights only: gated
    mean_abs: float
    tolerance: float
    matmuls: int  # MatMulInteger nodes whose int32 outputs were recomputed
    kernel_mismatches: int  # output values differing from the exact integer product: gated
    shipped_max_abs: float  # the graph as shipped vs torch with activation quantization
    shipped_mean_abs: float
    reference_max_abs: float

    @property
    def passed(self) -> bool:
        return self.max_abs < self.tolerance and self.kernel_mismatches == 0

    def failures(self) -> list[str]:
        out = []
        if self.max_abs >= self.tolerance:
            out.append(f"vision_encoder (int8) graph vs torch carrying its integers: max-abs "
                       f"{self.max_abs:.3g} is over {self.tolerance:.3g}")
        if self.kernel_mismatches:
            out.append(f"vision_encoder (int8): {self.kernel_mismatches} MatMulInteger outputs "
                       f"differ from the exact integer product of their inputs (a saturating "
                       f"int8 kernel on this CPU?)")
        return out


def _chains(graph) -> list[tuple]:
    """(MatMulInteger, its DynamicQuantizeLinear, Cast, Mul) for each quantized MatMul."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in graph.node:
        if n.op_type != "MatMulInteger":
            continue
        quant = producer[n.input[0]]
        (cast,) = consumers[n.output[0]]
        (mul,) = consumers[cast.output[0]]
        assert quant.op_type == "DynamicQuantizeLinear" and cast.op_type == "Cast" \
            and mul.op_type == "Mul", f"{n.name}: not quantize_dynamic's MatMul chain"
        out.append((n, quant, cast, mul))
    return out


def _float_activations(model):
    """A copy of the int8 graph whose quantized MatMuls multiply float activations by their
    weights' float value (q − z)·s; everything else as shipped."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    drop = set()
    for mm, quant, cast, mul in _chains(g):
        base = mm.input[1].removesuffix("_quantized")
        q = numpy_helper.to_array(inits[mm.input[1]]).astype(np.float32)  # (K, N)
        z = numpy_helper.to_array(inits[mm.input[3]]).astype(np.float32)
        w = (q - z) * numpy_helper.to_array(inits[f"{base}_scale"])
        g.initializer.append(numpy_helper.from_array(w.astype(np.float32), f"{base}_float"))
        g.node.append(helper.make_node("MatMul", [quant.input[0], f"{base}_float"],
                                       [mul.output[0]], name=f"{mm.name}_float"))
        drop.update((n.op_type, tuple(n.output)) for n in (mm, cast, mul))
    kept = [n for n in g.node if (n.op_type, tuple(n.output)) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return _topological(model)


def _topological(model):
    """Nodes reordered so each comes after its inputs' producers (the replacements were
    appended at the end)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes, done = list(g.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                done.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        assert len(rest) < len(nodes), "the int8 graph's copy has a cycle"
        nodes = rest
    del g.node[:]
    g.node.extend(done)
    return model


def _session(model, scratch: Path):
    """An onnxruntime session on `model`, written beside the export with external data (a
    large tower's float copy can pass protobuf's 2 GB)."""
    import onnx
    import onnxruntime as ort

    path = scratch / "graph.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="graph.onnx.data")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the copies leave the replaced integers unread: no warning
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, pixels: np.ndarray) -> dict:
    from edgevlm.runtime.tiling import full_mask

    feeds = {"pixel_values": pixels}
    if "pixel_attention_mask" in {i.name for i in session.get_inputs()}:
        feeds["pixel_attention_mask"] = full_mask(pixels)
    return feeds


def _runs(session, pixels) -> list[list[np.ndarray]]:
    """Every output of `session` per run: one run on an array of pixels, one per image on a
    patch graph's feeds (Qwen2-VL)."""
    if not isinstance(pixels, list):
        return [session.run(None, _feeds(session, pixels))]
    return [session.run(None, f) for f in pixels]


def _features(session, pixels) -> np.ndarray:
    """The image features (the first output), concatenated over the runs."""
    return np.concatenate([r[0] for r in _runs(session, pixels)])


def _kernel_mismatches(model, pixels, scratch: Path) -> tuple[int, int]:
    """(MatMulInteger nodes, output values that differ from the exact product of their inputs)
    on the shipped graph `model`, which gets those values as extra outputs (in place)."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    chains = _chains(g)
    wanted = []
    for mm, _, _, _ in chains:
        for name, dtype in ((mm.input[0], onnx.TensorProto.UINT8),
                            (mm.input[2], onnx.TensorProto.UINT8),
                            (mm.output[0], onnx.TensorProto.INT32)):
            if name not in wanted:
                g.output.append(helper.make_tensor_value_info(name, dtype, None))
                wanted.append(name)
    session = _session(model, scratch)
    names = [o.name for o in session.get_outputs()]
    bad = 0
    for run in _runs(session, pixels):
        got = dict(zip(names, run, strict=True))
        for mm, _, _, _ in chains:
            a = got[mm.input[0]].astype(np.int64) - got[mm.input[2]].astype(np.int64)
            b = inits[mm.input[1]].astype(np.int64) - inits[mm.input[3]].astype(np.int64)
            bad += int((np.matmul(a, b) != got[mm.output[0]]).sum())
    return len(chains), bad


def check(path: Path, pixels, ref: Int8Cost) -> VisionCheck:
    """The int8 vision graph at `path` on the validation pixels, against `ref` (see above)."""
    import shutil

    import onnx
    import onnxruntime as ort

    shipped = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = _features(shipped, pixels)
    model = onnx.load(str(path))  # a copy of the file's graph: the checks may change it
    scratch = path.parent / ".vision_check"
    scratch.mkdir(exist_ok=True)
    try:
        floats = _session(_float_activations(model), scratch)
        got = _features(floats, pixels)
        matmuls, bad = _kernel_mismatches(model, pixels, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    scale = float(np.abs(ref.weights_only).max())
    diff = np.abs(got.astype(np.float64) - ref.weights_only)
    shipped_diff = np.abs(out.astype(np.float64) - ref.carried)
    return VisionCheck(float(diff.max()), float(diff.mean()), max(CARRIED_TOLERANCE * scale, 1e-6),
                       matmuls, bad, float(shipped_diff.max()), float(shipped_diff.mean()),
                       scale)
