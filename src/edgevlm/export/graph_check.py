"""Parity of a built int4/int8 decoder that checks the graph, not the rounding.

Against the float model, a quantized decoder differs by its rounding error, which grows with the
model (a real 30-layer LM's RTN error is far over any bound a toy model sets): a fixed tolerance
either fails a good export or hides a broken graph. So the decoder is compared with the torch
model carrying the very integers the graph holds (edgevlm.export.decoder.carry: each Linear's
weight replaced by (q - z)·s), where the only difference left is float arithmetic:

  * teacher forcing on the carried model's greedy tokens: the prompt embeddings (image features
    scattered in) and then each generated token's embedding, all from torch, through the decoder
    graph alone, so no other component's rounding enters;
  * gated: logits max-abs within GRAPH_TOLERANCE (of the graph's activation dtype) and each
    step's argmax equal to torch's token, or a near tie (the two within that tolerance in
    torch's logits), on the graph with MatMulNBits accuracy_level 0 (float compute; a copy of
    the shipped graph with that one attribute changed when it ships with another level);
  * reported: the same for the graph as shipped (accuracy_level 4 rounds activations to int8
    per block, a second rounding by design).
The float-vs-quantized difference stays in the parity report as information.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.export.reference import FP32_MAX_ABS, Reference, step_positions
from edgevlm.runtime.contract import Activations

# Relative to the reference's largest logit, with FP32_MAX_ABS as the floor: both sides multiply
# by the same float weights, in a different summation order. A graph with fp16 activations (the
# gpu profile, --precision fp16) rounds every activation to 11 significant bits, so its bound is
# that of fp16 arithmetic through the layers, not of a summation order.
GRAPH_TOLERANCE = {"fp32": 2e-5, "fp16": 1e-2}


@dataclass(frozen=True)
class GraphCheck:
    reference: str  # what the graph was compared with
    accuracy_level: int  # of the graph that was gated (0: float compute)
    steps: int  # logits compared: the prompt's last position and every teacher-forced step
    max_abs: float
    mean_abs: float
    tolerance: float
    matching_steps: int  # steps whose argmax equals torch's greedy token
    shipped_accuracy_level: int  # the graph as written; reported only
    shipped_max_abs: float
    shipped_matching_steps: int

    @property
    def tokens_identical(self) -> bool:
        return self.matching_steps == self.steps

    def failures(self) -> list[str]:
        out = []
        if self.max_abs >= self.tolerance:
            out.append(f"decoder graph vs torch carrying its integers: logits max-abs "
                       f"{self.max_abs:.3g} is over {self.tolerance:.3g}")
        if not self.tokens_identical:
            out.append(f"decoder graph vs torch carrying its integers: greedy tokens agree at "
                       f"{self.matching_steps} of {self.steps} steps")
        return out


def _float_compute_copy(path: Path) -> Path:
    """A copy of the graph at `path` with every MatMulNBits (and QMoE) at accuracy_level 0,
    beside it (so
    its external data resolves); the caller deletes it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type in ("MatMulNBits", "QMoE") and attr.name == "accuracy_level":
                attr.i = 0
    copy = path.with_name(path.stem + ".check.onnx")
    onnx.save_model(model, str(copy))
    return copy


def teacher_forced(path: Path, ref: Reference, dims) -> np.ndarray:
    """(steps, V) logits of the decoder at `path` fed torch's prompt and greedy tokens."""
    import onnxruntime as ort

    from edgevlm.runtime.kv_buffer import SharedKV

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kv = SharedKV(session, dims.num_layers)
    merged = ref.inputs_embeds.copy()
    merged[ref.input_ids == ref.image_token_id] = ref.slot_features
    start = merged.shape[1]
    cache = kv.new_cache(start + len(ref.tokens))
    steps = [kv.decode(merged, 0, cache, positions=ref.positions)[0, -1]]
    for j in range(len(ref.tokens) - 1):
        steps.append(kv.decode(ref.step_embeds[None, j: j + 1], start + j, cache,
                               positions=step_positions(ref, start + j))[0, -1])
    return np.stack(steps).astype(np.float32)


def _compare(logits: np.ndarray, ref: Reference, tol: float) -> tuple[float, float, int]:
    """(max-abs, mean-abs, steps whose argmax is torch's token or ties it within `tol`)."""
    diff = np.abs(logits.astype(np.float64) - ref.step_logits)
    masked = logits.copy()
    masked[:, ref.suppressed] = -np.inf
    picked = masked.argmax(-1)
    rows = np.arange(len(picked))
    tokens = np.asarray(ref.tokens)
    tied = ref.step_logits[rows, picked] >= ref.step_logits[rows, tokens] - tol
    matching = int(((picked == tokens) | tied).sum())
    return float(diff.max()), float(diff.mean()), matching


def check_graph(path: Path, accuracy_level: int, carried: Reference, dims,
                activations: Activations = Activations.FP32) -> GraphCheck:
    """The graph check of the built decoder at `path` (see the module docstring)."""
    assert carried.step_embeds is not None, "the reference lacks the greedy tokens' embeddings"
    tol = max(FP32_MAX_ABS,
              GRAPH_TOLERANCE[activations] * float(np.abs(carried.step_logits).max()))
    shipped = _compare(teacher_forced(path, carried, dims), carried, tol)
    gated = shipped
    if accuracy_level != 0:
        copy = _float_compute_copy(path)
        try:
            gated = _compare(teacher_forced(copy, carried, dims), carried, tol)
        finally:
            copy.unlink()
    return GraphCheck("torch model carrying the graph's integers (teacher-forced on its greedy "
                      "tokens)", 0, len(carried.tokens), gated[0], gated[1], tol, gated[2],
                      accuracy_level, shipped[0], shipped[2])
