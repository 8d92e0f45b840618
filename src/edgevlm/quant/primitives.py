"""The three primitives that carry all quantization math, and the quantization config.

Every method (RTN, GPTQ, Q-VLM), the checkpoint writer and the int4 exporter go through
`choose_qparams`, `quantize` and `dequantize`, so the integers a search picked are the integers
that land in the checkpoint and in the ONNX graph (torchao's `quant_primitives` in spirit).

Convention (the one compressed-tensors, GPTQ and onnxruntime MatMulNBits share, up to an
offset): a weight W (N out, K in) is cut into groups of `group_size` consecutive input columns;
each (row, group) has a float scale s and an integer zero point z in [0, 2^bits - 1], and

    q = clamp(round(w / s) + z, 0, 2^bits - 1)          (unsigned integers)
    w ≈ (q - z) * s

Symmetric quantization is the special case z = 2^(bits-1) for every group (the signed range
[-2^(b-1), 2^(b-1) - 1] shifted to unsigned), so one code path serves both.

Ragged groups: a row of K columns holds G = ceil(K / group_size) groups and the last one holds
the K mod group_size columns left over (when group_size does not divide K), with qparams of its
own, as onnxruntime's MatMulNBits lays out its blocks and compressed-tensors shapes its scales
(N, ceil(K / group_size)). Ranges always include 0, so padding the last group with zeros to a
whole group changes neither its min/max nor its scale: that is how the primitives compute it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from edgevlm.errors import check_seed
from edgevlm.quant.methods import (
    METHODS,
    GptqConfig,
    QvlmConfig,
    check_tuple,
    config_error,
    tuples,
)

MIN_GROUP = 16  # group sizes are powers of two >= 16 (MatMulNBits' block sizes), or -1
ACT_BITS = (16, 8, 6, 4)
SCALE_RULES = ("absmax", "signed")  # symmetric scales: see QuantConfig.scale_rule
MIN_CALIB_SAMPLES = 2


def n_groups(k: int, group_size: int) -> int:
    """Groups per row of `k` columns: ceil(k / group_size); the last may be ragged."""
    return 1 if group_size == -1 else math.ceil(k / group_size)


@dataclass(frozen=True)
class QParams:
    """Per (output row, group) scale and zero point, groups of `group_size` columns (the last
    one of a row may hold fewer: K mod group_size)."""

    scale: torch.Tensor  # (N, G) float32, > 0
    zero_point: torch.Tensor  # (N, G) int32 in [0, 2^bits - 1]
    bits: int
    group_size: int  # columns per group; G = ceil(K / group_size)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def per_column(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point), each (N, k): every column's own group's values."""
        g = self.scale.shape[1]
        assert g == math.ceil(k / self.group_size), \
            f"{g} groups of {self.group_size} do not cover {k} columns"
        return (self.scale.repeat_interleave(self.group_size, dim=1)[:, :k],
                self.zero_point.repeat_interleave(self.group_size, dim=1)[:, :k])


def _padded_groups(w: torch.Tensor, gs: int) -> torch.Tensor:
    """(N, K) -> (N, G, gs), the ragged last group padded with zeros."""
    n, k = w.shape
    g = math.ceil(k / gs)
    return F.pad(w, (0, g * gs - k)).reshape(n, g, gs)


def choose_qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                   clip: float | torch.Tensor = 1.0, signed: bool = False) -> QParams:
    """Min/max qparams of `w` (N, K) per row and group of `group_size` columns (-1: whole row;
    a group size that does not divide K leaves a ragged last group with its own qparams).

    `clip` (a float or an (N, G) tensor in (0, 1]) shrinks each group's range before the scale
    is computed: the clipping scale that AWQ-style and Q-VLM searches choose. Ranges always
    include 0 (as in the GPTQ reference), so an all-zero group dequantizes to exact zeros (and
    the zeros that pad a ragged group change nothing).
    """
    w = w.detach().float()
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    assert gs >= 1, f"group size {group_size}"
    g = _padded_groups(w, gs)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    xmin = torch.minimum(g.amin(-1), zero)
    xmax = torch.maximum(g.amax(-1), zero)  # (N, G)
    clip = torch.as_tensor(clip, dtype=w.dtype, device=w.device)
    maxq = (1 << bits) - 1
    if symmetric and signed:
        # llama.cpp's Q4_0 rule: the group's largest-magnitude weight lands exactly on the
        # integer -2^(b-1) (the scale takes its sign, so it may be negative), and the step is
        # |w_ext| / 2^(b-1), finer than absmax's 2|w_ext| / (2^b - 1)
        ext = torch.where(-xmin >= xmax, xmin, xmax) * clip
        scale = -ext / (1 << (bits - 1))
        zp = torch.full_like(scale, 1 << (bits - 1))
    elif symmetric:
        amax = torch.maximum(-xmin, xmax) * clip
        scale = 2 * amax / maxq
        zp = torch.full_like(scale, 1 << (bits - 1))
    else:
        xmin, xmax = xmin * clip, xmax * clip
        scale = (xmax - xmin) / maxq
        zp = torch.round(-xmin / torch.where(scale > 0, scale, 1.0))
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # a flat zero group
    zp = zp.clamp(0, maxq).to(torch.int32)
    return QParams(scale.contiguous(), zp.contiguous(), bits, gs)


def quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integers q (N, K) int32 in [0, 2^bits - 1] for `w` under `qp`."""
    w = w.detach().float()
    scale, zp = qp.per_column(w.shape[1])
    q = torch.round(w / scale) + zp
    return q.clamp(0, qp.maxq).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float weights (q - z) * s (N, K) float32; exactly what compressed-tensors computes."""
    scale, zp = qp.per_column(q.shape[1])
    return (q.to(scale.dtype) - zp.to(scale.dtype)) * scale


def fake_quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    return dequantize(quantize(w, qp), qp)


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear layer's weight as integers plus qparams: W ≈ dequantize(q, qparams)."""

    q: torch.Tensor  # (N, K) int32
    scale: torch.Tensor  # (N, G) float32, G = ceil(K / group_size)
    zero_point: torch.Tensor  # (N, G) int32
    bits: int
    group_size: int  # columns per group; the last group of a row holds K mod group_size if ragged

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.bits, self.group_size)

    @property
    def ragged(self) -> bool:
        return self.q.shape[1] % self.group_size != 0

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.qparams)

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.q.to(device), self.scale.to(device),
                               self.zero_point.to(device), self.bits, self.group_size)


def name_ends(name: str, end: str) -> bool:
    """Whether module `name` ends with the whole dotted parts `end` (v_proj, mlp.down_proj)."""
    return name == end or name.endswith("." + end)


@dataclass(frozen=True)
class QuantConfig:
    """What `edgevlm quantize` does; saved as JSON in quant_report.json beside the weights.

    The fields every method shares; each method's own knobs sit in its config, `gptq` and
    `qvlm` (quant/methods.py), held whatever the method: Q-VLM runs GPTQ too (its per-layer
    pass and its guard), and RTN reads neither. JSON reads back through `from_dict`.
    """

    method: str = "qvlm"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True  # llm-compressor's W4A16 scheme; plain from_pretrained loads it
    # symmetric scales: "absmax" (step 2·max|w| / (2^b − 1)) or "signed" (llama.cpp Q4_0: the
    # extreme weight exactly on −2^(b−1), step max|w| / 2^(b−1), a scale that may be negative).
    # None: signed for symmetric weights of 2 to 4 bits (on SmolLM2 it lowered every method's
    # perplexity rise, RTN's +53% to +24%; docs/results/quant-ranking.md), absmax otherwise
    scale_rule: str | None = None
    # Mixed precision: (name, bits) pairs. A Linear whose module name ends with `name` (its last
    # part, e.g. "v_proj", or several, e.g. "mlp.down_proj") is quantized at those bits, every
    # other at `bits`; llama.cpp's Q4_K_M spends more bits on attn_v and ffn_down the same way.
    # Its scale rule is `scale_rule` where that rule allows its bits, else absmax.
    layer_bits: tuple[tuple[str, int], ...] = ()
    act_bits: int = 16  # 16 = weight-only
    calib_samples: int = 128
    quantize_vision: bool = False
    skip: tuple[str, ...] = ("multi_modal_projector", "lm_head")
    seed: int = 0
    # Activation clip ratios searched per Linear at act_bits 6 and 4 (8 keeps 1.0, as onnxruntime)
    act_clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
    batch_size: int = 8  # calibration samples per forward pass
    gptq: GptqConfig = field(default_factory=GptqConfig)
    qvlm: QvlmConfig = field(default_factory=QvlmConfig)

    def __post_init__(self):
        def bad(name: str, value, fix: str):
            raise config_error(name, value, fix)

        if self.method == "nf4":
            bad("method", self.method, "edgevlm no longer offers NF4 (it ran only through "
                "bitsandbytes on CUDA and could not be exported or tested here); load the float "
                "model with transformers' BitsAndBytesConfig(load_in_4bit=True, "
                "bnb_4bit_quant_type='nf4') for that baseline, or use --method gptq, qvlm or rtn")
        if self.method not in METHODS:
            bad("method", self.method, f"use one of {', '.join(METHODS)}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            bad("bits", self.bits, "the pack-quantized format stores 2..8 bits (e.g. --bits 4)")
        gs = self.group_size
        if not isinstance(gs, int) or (gs != -1 and (gs < MIN_GROUP or gs & (gs - 1))):
            bad("group_size", gs, f"use a power of two >= {MIN_GROUP} (32, 64, 128, ...; "
                "MatMulNBits' block sizes), or -1 for one group per row")
        if self.scale_rule is None:
            # The one field filled in here, not left None beside a resolved property: the rule
            # is part of what the config is, so that the report names the rule used and the
            # JSON reads back equal (from_dict(to_dict()) == cfg), which a None could not give
            object.__setattr__(self, "scale_rule", "signed" if self.symmetric and self.bits <= 4
                               else "absmax")
        if self.scale_rule not in SCALE_RULES:
            bad("scale_rule", self.scale_rule, f"use one of {', '.join(SCALE_RULES)}")
        if self.scale_rule == "signed" and (not self.symmetric or self.bits > 4):
            bad("scale_rule", self.scale_rule, "the signed rule (llama.cpp's Q4_0) is for "
                "symmetric weights of 2 to 4 bits; use --scale-rule absmax, or --symmetric "
                "with --bits 4 or fewer")
        self._check_layer_bits()
        if self.act_bits not in ACT_BITS:
            bad("act_bits", self.act_bits, "use 16 (weight-only), 8 (W8A8, deployable through "
                "onnxruntime int8) or 6 / 4 (simulated, research mode)")
        if self.calib_samples < MIN_CALIB_SAMPLES:
            bad("calib_samples", self.calib_samples,
                f"calibration needs at least {MIN_CALIB_SAMPLES} samples")
        for name, kind in (("gptq", GptqConfig), ("qvlm", QvlmConfig)):
            if not isinstance(getattr(self, name), kind):
                bad(name, getattr(self, name), f"give a {kind.__name__} (QuantConfig.from_dict "
                    "reads JSON)")
        # GPTQ chooses a group's qparams at its first column, so a lazy block must start on a
        # group boundary: a multiple of the group size (a ragged last group then ends the last
        # block, which is cut short at K).
        if self.group_size > 0 and self.gptq.gptq_block % self.group_size:
            bad("gptq_block", self.gptq.gptq_block, "use a multiple of the group size, e.g. "
                f"{max(128, self.group_size)}")
        check_tuple("act_clip_grid", self.act_clip_grid)
        if not self.act_clip_grid or any(not 0 < c <= 1 for c in self.act_clip_grid):
            bad("act_clip_grid", self.act_clip_grid, "clip ratios must lie in (0, 1]")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "use at least 1")
        check_seed(self.seed)
        check_tuple("skip", self.skip)

    def _check_layer_bits(self) -> None:
        def bad(fix: str):
            raise config_error("layer_bits", self.layer_bits, fix)

        check_tuple("layer_bits", self.layer_bits)
        for pair in self.layer_bits:
            check_tuple("layer_bits", pair)
            name, b = pair
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name, re.ASCII) \
                    or name.endswith(".") or ".." in name:
                bad(f"{name!r} is not a module name; give the end of a Linear's name, as in "
                    "v_proj=8 or mlp.down_proj=8")
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                bad(f"{name}={b}: the pack-quantized format stores 2..8 bits")
        names = [n for n, _ in self.layer_bits]
        for i, a in enumerate(names):  # the first match wins: two that can match one Linear
            for c in names[i + 1:]:  # would store one bits and report the other
                if a == c:
                    bad(f"{a} is given twice; give each layer once")
                if name_ends(a, c) or name_ends(c, a):
                    bad(f"{a} and {c} can name the same Linear; give each layer once")
        if self.layer_bits and not self.symmetric:
            bad("mixed bits need symmetric weights: an asymmetric checkpoint loads only through "
                "transformers' dequantize-on-load, which reads every layer with one config "
                "group's bits; drop --asymmetric")
        if self.layer_bits and self.act_bits != 16:
            bad("mixed bits are for weight-only quantization; drop --act-bits or --layer-bits")

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """The config a JSON dict holds: `to_dict`'s (quant_report.json, a resume's run.json),
        or the flat one that reports held before each method's knobs got a config of their own
        (issue 32), every knob beside the shared fields. JSON's lists come back as tuples and
        layer_bits may be a {name: bits} mapping."""
        d = tuples(d)
        if isinstance(d.get("layer_bits"), dict):
            d["layer_bits"] = tuple(d["layer_bits"].items())
        for key, kind in (("gptq", GptqConfig), ("qvlm", QvlmConfig)):
            own = d.pop(key, {})
            own = asdict(own) if isinstance(own, kind) else tuples(own)
            flat = {f.name: d.pop(f.name) for f in fields(kind) if f.name in d}
            d[key] = kind(**{**flat, **own})
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def bits_for(self, name: str) -> int:
        """The bits of the Linear called `name`: the first layer_bits entry its name ends
        with, else `bits`."""
        return next((b for end, b in self.layer_bits if name_ends(name, end)), self.bits)

    def for_layer(self, name: str) -> QuantConfig:
        """The config that quantizes the Linear called `name` (its own bits)."""
        bits = self.bits_for(name)
        if bits == self.bits:
            return self
        rule = self.scale_rule if self.scale_rule != "signed" or bits <= 4 else "absmax"
        return replace(self, bits=bits, scale_rule=rule, layer_bits=())

    @property
    def signed(self) -> bool:
        """choose_qparams' `signed`: the scale rule is llama.cpp's Q4_0."""
        return self.scale_rule == "signed"
