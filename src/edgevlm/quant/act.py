"""Activation quantization (W8A8, W6A6, W4A4): fake-quantized Linear inputs, with a clipping ratio
per Linear searched on calibration data.

Choices, each written down because the issue leaves room:

1. Granularity. Per-token dynamic, asymmetric: every token's input row x (K,) gets its own
   min/max range (always including 0) shrunk by the Linear's clip ratio α, and its own scale
   and zero point, through the same `choose_qparams` / `quantize` / `dequantize` as the weights
   (an input (T, K) is quantized like a weight with one group per row). Dynamic ranges need no
   static scale that could miss an outlier seen only at inference, and per-token results do not
   depend on how a batch is padded, so `edgevlm eval` measures the same model at any batch size.
2. Where. The inputs of every decoder Linear whose weight is quantized (q/k/v/o, gate/up/down).
   lm_head, the projector, the vision tower (its weights too are only rounded with
   --quantize-vision), attention's softmax and matmuls, norms and the KV cache stay float.
3. Clip search (`search_layer`, act_bits 6 and 4 only). For each Linear, α from
   `QuantConfig.act_clip_grid` minimising the Linear's output error on calibration data,
   ‖Ŵ·q_α(x) − W·x‖² / ‖W·x‖² over real tokens, W the float weight and Ŵ the quantized one
   that the weight method just chose (so α and Ŵ are judged together, against the float layer).
   The search runs inside the calibration walk, for rtn, gptq and qvlm alike, after a block's
   weights are quantized: layer by layer, each layer's inputs come through the already
   quantized weights *and* activations of every earlier layer, and the chosen quantizers are
   installed before the next layer is searched. Q-VLM's block search (β) itself sees float
   activations inside the block.
4. W8A8 keeps α = 1 (no search): it stands for onnxruntime's dynamic quantization, which does not
   clip (`DEPLOYMENT` says what maps and what is simulated). Its per-channel int8 weights come
   from the chosen method as usual; `edgevlm export --precision int8` re-rounds the float model.
5. Decisions are data: `ActQuantSpec` (bits and α per Linear) is saved under "activations" in
   quant_report.json; `install_from_checkpoint` puts the forward pre-hooks back on a loaded
   model, which is what `edgevlm eval` does, so it measures the quantized-activation model.
   transformers or vLLM loading the checkpoint on their own see weight-only quantization.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgevlm.quant.calibrate import visit_inputs
from edgevlm.quant.primitives import choose_qparams, fake_quantize

SEARCHED_BITS = (6, 4)
SCHEME = "per-token dynamic asymmetric (each token's min/max input range times the clip ratio)"
DEPLOYMENT = (
    "W8A8 maps to `edgevlm export --precision int8`: onnxruntime quantize_dynamic gives each "
    "MatMul int8 per-channel symmetric weights and DynamicQuantizeLinear activations (uint8 "
    "asymmetric, min/max range without clipping, as here). From a checkpoint quantized with "
    "--bits 8 --group-size -1 --symmetric the exporter writes that checkpoint's own integers "
    "and scales into the MatMulInteger weights (edgevlm.json int8_source: checkpoint), so GPTQ "
    "/ Q-VLM W8A8 ships as searched; from a float model it rounds to nearest. "
    "Simulated here in torch: the integer matmul (fake quantization in float32) and the range "
    "granularity: onnxruntime takes one range per tensor, equal to ours when one token passes "
    "(decoding at batch 1) and coarser at prefill; it also quantizes lm_head and the vision "
    "encoder's MatMuls, which stay float here.")
RESEARCH = ("simulated (research mode): no runtime edgevlm targets executes 4- or 6-bit "
            "activations; the numbers are fake quantization in torch")


def fake_quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """x (..., K) with every row fake-quantized to `bits` over its own (clipped) range."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (T, K)
    out = fake_quantize(rows, choose_qparams(rows, bits, -1, False, clip))
    return out.to(x.dtype).reshape(x.shape)


def clip_errors(x: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor, bits: int,
                grid: tuple[float, ...]) -> tuple[torch.Tensor, float]:
    """Squared output errors Σ‖q_α(x)Ŵᵀ − xWᵀ‖² per α in `grid` (len(grid),) float64, and the
    reference energy Σ‖xWᵀ‖², for inputs x (T, K), float weight W and quantized Ŵ (N, K)."""
    x = x.float()
    ref = x @ W.float().T  # (T, N)
    errs = torch.stack([(fake_quantize_tokens(x, bits, a) @ Wq.float().T - ref).double()
                        .pow(2).sum() for a in grid])
    return errs, float(ref.double().pow(2).sum())


@dataclass(frozen=True)
class ActQuantSpec:
    """Activation quantizers: bits and the clip ratio of each Linear's input, by module name."""

    bits: int
    clip: dict[str, float]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> α -> rel. error

    @property
    def searched(self) -> bool:
        return self.bits in SEARCHED_BITS

    def to_dict(self) -> dict:
        return {"bits": self.bits, "scheme": SCHEME, "searched": self.searched,
                "mode": "deployable" if self.bits == 8 else RESEARCH,
                "deployment": DEPLOYMENT if self.bits == 8 else None,
                "evaluated_by": "edgevlm eval installs forward pre-hooks that fake-quantize these "
                                "Linears' inputs (edgevlm.quant.act.install_from_checkpoint)",
                "float": "lm_head, projector, vision tower, attention softmax/matmuls, norms, "
                         "KV cache",
                "clip": self.clip, "relative_errors": self.errors}

    @classmethod
    def from_dict(cls, d: dict) -> ActQuantSpec:
        return cls(int(d["bits"]), {k: float(v) for k, v in d["clip"].items()},
                   d.get("relative_errors", {}))


def search_layer(layer, targets: dict[str, torch.nn.Linear], fp: dict[str, torch.Tensor], xs,
                 kws, masks, bits: int, grid: tuple[float, ...]) -> dict[str, dict[float, float]]:
    """One pass of a decoder layer over its inputs: each target's relative output error
    ‖Ŵq_α(x) − Wx‖/‖Wx‖ per α in `grid`; `fp` holds the float weights, the targets Ŵ."""
    sums = {n: torch.zeros(len(grid), dtype=torch.float64) for n in targets}
    energy = dict.fromkeys(targets, 0.0)

    def visit(name: str, x: torch.Tensor) -> None:
        errs, ref = clip_errors(x, fp[name], targets[name].weight.detach(), bits, grid)
        sums[name] += errs.to(sums[name].device, torch.float64)
        energy[name] += ref

    visit_inputs(layer, xs, kws, masks, targets, visit)
    return {n: {a: float((e / max(energy[n], 1e-30)) ** 0.5) for a, e in zip(grid, sums[n])}
            for n in targets}


def best_clip(errors: dict[float, float]) -> float:
    """The α of least error; ties go to the larger α (less clipping)."""
    return min(errors, key=lambda a: (errors[a], -a))


class ActHooks:
    """Forward pre-hooks that fake-quantize Linear inputs; `remove()` takes them off."""

    def __init__(self) -> None:
        self._handles: list = []

    def install(self, modules: dict[str, torch.nn.Module], spec: ActQuantSpec) -> None:
        missing = set(spec.clip) - set(modules)
        assert not missing, f"activation quantizers for unknown modules {sorted(missing)[:3]}"
        for name, clip in spec.clip.items():
            self._handles.append(modules[name].register_forward_pre_hook(
                _hook(spec.bits, clip)))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _hook(bits: int, clip: float):
    def fn(module, args):
        return (fake_quantize_tokens(args[0], bits, clip), *args[1:])
    return fn


def read_spec(model_dir: str | Path) -> ActQuantSpec | None:
    """The activation quantizers a checkpoint's quant_report.json records (None: weight-only)."""
    from edgevlm.quant.checkpoint import REPORT

    path = Path(model_dir) / REPORT
    if not path.is_file():
        return None
    acts = json.loads(path.read_text()).get("activations")
    return ActQuantSpec.from_dict(acts) if acts else None


def install_from_checkpoint(model, model_dir: str | Path) -> ActHooks | None:
    """Put a checkpoint's activation quantizers on `model` (loaded from `model_dir`)."""
    spec = read_spec(model_dir)
    if spec is None:
        return None
    hooks = ActHooks()
    hooks.install(dict(model.named_modules()), spec)
    return hooks


def load_for_eval(model_dir: str | Path, device: str | None = None):
    """The model `edgevlm eval` measures: a quantized checkpoint as plain Linears holding
    (q − z)·s exactly (the loader route that also reads asymmetric zero points), with its
    activation quantizers installed; a float model as it is. On `device` (default the CPU)."""
    from edgevlm.models import load_model
    from edgevlm.quant.checkpoint import is_quantized

    with warnings.catch_warnings():
        # transformers warns that the checkpoint's own quantization_config wins; only its
        # `dequantize` flag matters here, and that one is applied.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        loaded = load_model(model_dir, device=device, dequantize=is_quantized(model_dir))
    install_from_checkpoint(loaded.model, model_dir)
    return loaded
