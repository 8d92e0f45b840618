"""Linear layers of the built decoder, by precision, and the integers they carry.

    fp32 / fp16   x ──MatMul(W (K, N))──► y
    int4 / int8   x ──MatMulNBits(q, scales, zero points; bits, block_size, accuracy_level)──► y

The integers of every quantized layer are decided once, before the graph is written, as a plan
{graph weight name: NBitsWeight}: a quantized checkpoint's own integers where it has them
(edgevlm.export.source, unchanged), and round-to-nearest through edgevlm.quant.primitives
(choose_qparams / quantize, asymmetric, one scale and zero point per block of `block_size` input
channels) for the rest, at 8 bits where a checkpoint left the layer in float (its LM head).
`carry` then puts exactly those integers, dequantized, into the torch
model, which is the reference the graph is validated against: the check is of the graph, not of
the rounding.

8 bits: MatMulNBits bits=8 holds one byte per weight; an 8-bit per-channel checkpoint becomes
blocks that all repeat their row's scale, which is the same W = (q - z)·s.
accuracy_level: 0 computes in the activations' float type; 4 quantizes the activations to int8
per block on the fly (CPU kernels; several times faster decode on x86 and Arm). The value is
chosen per provider (ACCURACY_LEVELS) and recorded in edgevlm.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.export import int4, int8
from edgevlm.export.builder.graph import MS_DOMAIN, Graph

BITS = {"int4": 4, "int8": 8}
# MatMulNBits accuracy_level per export profile: the default (CPU) profile takes int8
# activations; the gpu profile's CUDA kernels ignore it, so it keeps the float compute type.
ACCURACY_LEVELS = {"default": 4, "gpu": 0}


@dataclass(frozen=True)
class NBitsWeight:
    """y = x @ W.T with W = (q - zero_point) · scale per (row, block of input channels)."""

    q: np.ndarray  # (N, K) uint8 in [0, 2^bits - 1]
    scales: np.ndarray  # (N, ceil(K / block_size)) float32
    zero_points: np.ndarray  # (N, ceil(K / block_size)) uint8
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        """W (N, K) float32."""
        k = self.q.shape[1]
        s = np.repeat(self.scales, self.block_size, axis=1)[:, :k]
        z = np.repeat(self.zero_points.astype(np.float32), self.block_size, axis=1)[:, :k]
        return (self.q.astype(np.float32) - z) * s


def from_int4(w: int4.Int4Weight) -> NBitsWeight:
    return NBitsWeight(w.q.astype(np.uint8), w.scales.astype(np.float32),
                       w.zero_points.astype(np.uint8), 4, w.block_size)


def from_int8(w: int8.Int8Weight, block_size: int) -> NBitsWeight:
    """An 8-bit per-channel checkpoint layer as MatMulNBits blocks (signed -> unsigned by +128;
    each block repeats its row's scale and zero point)."""
    n, k = w.q.shape
    blocks = -(-k // block_size)
    q = (w.q.astype(np.int16) + 128).astype(np.uint8)
    zp = np.repeat((w.zero_point.astype(np.int16) + 128).astype(np.uint8)[:, None], blocks, 1)
    scales = np.repeat(w.scale.astype(np.float32)[:, None], blocks, 1)
    return NBitsWeight(q, scales, zp, 8, block_size)


def rtn(weight, bits: int, block_size: int) -> NBitsWeight:
    """Round-to-nearest of a float weight (N, K) with the project's primitives."""
    import torch

    from edgevlm.quant.primitives import choose_qparams, quantize

    qp = choose_qparams(weight, bits, block_size, symmetric=False)
    q = quantize(weight, qp)
    return NBitsWeight(q.to(torch.uint8).cpu().numpy(), qp.scale.float().cpu().numpy(),
                       qp.zero_point.to(torch.uint8).cpu().numpy(), bits, block_size)


def plan(decoder, precision: str, block_size: int, checkpoint: dict | None) -> tuple[dict, set]:
    """The integers of every Linear of the decoder wrapper (edgevlm.export.graphs.Decoder) at
    `precision`: ({graph weight name: NBitsWeight}, names rounded here rather than read from
    the checkpoint)."""
    from torch import nn

    bits = BITS[precision]
    checkpoint = checkpoint or {}
    out, rounded = {}, set()
    for name, module in decoder.named_modules():
        if is_experts(module):
            held = checkpoint.get(f"{name}.gate_up_proj")
            if held is not None:  # the checkpoint's own integers (edgevlm quantize)
                out.update(experts_from_checkpoint(name, held, checkpoint[f"{name}.down_proj"],
                                                   block_size))
            else:
                out.update(plan_experts(name, module, bits, block_size))
                rounded.update((f"{name}.gate_up_proj", f"{name}.down_proj"))
            continue
        if not isinstance(module, nn.Linear):
            continue
        key = f"{name}.weight"
        held = checkpoint.get(key)
        if isinstance(held, NBitsWeight):  # a mixed checkpoint's 8-bit layer, as it is
            out[key] = held
        elif isinstance(held, (int4.Int4Weight, int8.Int8Weight)):
            out[key] = _nbits(held, block_size)
        else:
            # A layer a quantized checkpoint left in float (its skip list: the LM head) was kept
            # there on purpose; 8 bits keeps that choice nearly lossless. Rounding SmolLM2's tied
            # head to 4 bits cost a GPTQ checkpoint 11 of its 44.7 points on the shapes eval
            # (benchmarks/results/smollm2_chain.json).
            out[key] = rtn(module.weight.detach(), 8 if checkpoint else bits, block_size)
            rounded.add(key)
    return out, rounded


def is_experts(module) -> bool:
    """transformers' fused experts (Qwen2-MoE): gate_up_proj (E, 2I, D), down_proj (E, D, I)."""
    return (getattr(getattr(module, "gate_up_proj", None), "ndim", 0) == 3
            and getattr(getattr(module, "down_proj", None), "ndim", 0) == 3)


def expert_block_size(block_size: int, hidden: int, inter: int) -> int:
    """QMoE's block: both widths must divide by it (a power of two >= 16); the largest such
    block up to the export's, or a UserError naming the widths."""
    from edgevlm.errors import UserError

    b = block_size
    while b >= 16:
        if hidden % b == 0 and inter % b == 0:
            return b
        b //= 2
    raise UserError(f"onnxruntime's QMoE needs a block size (a power of two >= 16) that divides "
                    f"both the hidden size {hidden} and the expert width {inter}; none up to "
                    f"--block-size {block_size} does: export the experts in float (--precision "
                    "fp32) or resize the model")


def plan_experts(name: str, module, bits: int, block_size: int) -> dict:
    """Round-to-nearest integers of every expert: {"<name>.gate_up_proj": [NBitsWeight per
    expert], "<name>.down_proj": [...]}, all at one block size QMoE accepts."""
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    block = expert_block_size(block_size, gate_up.shape[2], down.shape[2])
    return {f"{name}.gate_up_proj": [rtn(w, bits, block) for w in gate_up],
            f"{name}.down_proj": [rtn(w, bits, block) for w in down]}


def _nbits(held, block_size: int) -> NBitsWeight:
    """A checkpoint layer's integers (int4 blocks, or int8 per channel) as MatMulNBits'."""
    return (from_int4(held) if isinstance(held, int4.Int4Weight)
            else from_int8(held, block_size))


def experts_from_checkpoint(name: str, gate_up: list, down: list, block_size: int) -> dict:
    """A quantized checkpoint's expert integers ([(gate, up)] and [down] per expert, as
    source.checkpoint_weights reads them) as plan entries; QMoE needs block-wise groups that
    divide both widths."""
    from edgevlm.errors import UserError

    first = gate_up[0][0]
    hidden, inter = first.q.shape[1], down[0].q.shape[1]
    if isinstance(first, int8.Int8Weight):  # per channel: any block repeats the row's scale
        block = expert_block_size(block_size, hidden, inter)
    else:
        block = first.block_size
    if block < 16 or block & (block - 1):
        raise UserError(f"{name}: the checkpoint's expert groups of {block} columns "
                        "are not blocks onnxruntime's QMoE reads (a power of two >= 16); "
                        "quantize with --group-size 32, 64 or 128")
    if expert_block_size(block, hidden, inter) != block:
        raise UserError(f"{name}: QMoE needs the expert group size {block} to divide the "
                        f"hidden size {hidden} and the expert width {inter}; quantize with "
                        f"--group-size {expert_block_size(block, hidden, inter)}")
    return {f"{name}.gate_up_proj": [concat_rows([_nbits(g, block), _nbits(u, block)])
                                     for g, u in gate_up],
            f"{name}.down_proj": [_nbits(d, block) for d in down]}


def carry(decoder, weights: dict, names: set) -> None:
    """Put the dequantized integers of `names` into the decoder's Linears, in place: the torch
    model then computes with exactly the weights the graph holds. A tied lm_head is untied first,
    so the token embedding keeps its float table."""
    import torch

    modules = dict(decoder.named_modules())
    for key in sorted(names):
        if isinstance(weights[key], list):  # one MoE layer's experts (plan_experts)
            owner, attr = key.rsplit(".", 1)
            module = modules[owner]
            value = np.stack([w.dequantize() for w in weights[key]])
            setattr(module, attr, torch.nn.Parameter(
                torch.from_numpy(value).to(getattr(module, attr).dtype), requires_grad=False))
            continue
        module = modules[key.removesuffix(".weight")]
        value = torch.from_numpy(weights[key].dequantize()).to(module.weight.dtype)
        module.weight = torch.nn.Parameter(value, requires_grad=False)


def nbits_node(g: Graph, w: NBitsWeight, x: str, name: str, prefix: str,
               accuracy_level: int, dtype=np.float32) -> str:
    """MatMulNBits `name` computing x @ W.T; initializers `<prefix>.qweight|scales|zero_points`
    (scales in the activations' float type `dtype`, as the op requires)."""
    from onnx import numpy_helper

    n, k = w.q.shape
    if w.bits == 4:
        node, inits = int4.matmul_nbits(int4.Int4Weight(w.q, w.scales, w.zero_points,
                                                        w.block_size), x, f"{name}/output_0",
                                        prefix)
        for t in inits:
            array = numpy_helper.to_array(t)
            g.weight(t.name, array.astype(dtype) if t.name.endswith(".scales") else array)
        return g.node("MatMulNBits", list(node.input), name, domain=MS_DOMAIN, K=k, N=n,
                      bits=4, block_size=w.block_size, accuracy_level=accuracy_level)[0]
    blocks, bs = w.scales.shape[1], w.block_size
    q = w.q
    if blocks * bs > k:  # a ragged last block, padded with its zero point: (q - z)·s = 0
        q = np.concatenate([q, np.repeat(w.zero_points[:, -1:], blocks * bs - k, 1)], axis=1)
    inputs = [x, g.weight(f"{prefix}.qweight", q.reshape(n, blocks, bs)),
              g.weight(f"{prefix}.scales", w.scales.reshape(-1).astype(dtype)),
              g.weight(f"{prefix}.zero_points", w.zero_points.reshape(-1))]
    return g.node("MatMulNBits", inputs, name, domain=MS_DOMAIN, K=k, N=n, bits=8,
                  block_size=bs, accuracy_level=accuracy_level)[0]


def concat_rows(ws: list[NBitsWeight]) -> NBitsWeight:
    """Several layers that read the same input as one (q, k and v into one MatMulNBits): their
    rows stacked, each row keeping its own scales."""
    if len(ws) == 1:
        return ws[0]
    assert len({(w.bits, w.block_size, w.q.shape[1]) for w in ws}) == 1, "mixed layouts"
    return NBitsWeight(*(np.concatenate([getattr(w, f) for w in ws])
                         for f in ("q", "scales", "zero_points")), ws[0].bits, ws[0].block_size)


@dataclass(frozen=True)
class Linears:
    """How this graph writes its Linear layers: float MatMuls in `dtype`, or MatMulNBits from
    `weights` (the plan)."""

    dtype: np.dtype  # float weights and activations
    weights: dict | None = None  # {graph weight name: NBitsWeight}; None for float graphs
    accuracy_level: int = 0

    def __call__(self, g: Graph, x: str, name: str, prefix: str, layers: list) -> str:
        """x @ W.T (+ b) as node `<name>/MatMul` (or `/MatMulNBits`) for `layers`, a list of
        (graph weight name, nn.Linear) that read x, stacked along the output dimension when
        more than one; initializers are named after `prefix`."""
        import torch

        if self.weights is not None:
            ws = [self.weights[key] for key, _ in layers]
            if len({w.bits for w in ws}) == 1:
                y = nbits_node(g, concat_rows(ws), x, f"{name}/MatMulNBits", prefix,
                               self.accuracy_level, self.dtype)
            else:  # a mixed checkpoint (e.g. v_proj at 8 bits): one node per layer, joined
                ys = [nbits_node(g, w, x, f"{name}/MatMulNBits_{i}", f"{prefix}.{i}",
                                 self.accuracy_level, self.dtype) for i, w in enumerate(ws)]
                y = g.node("Concat", ys, f"{name}/Concat", axis=-1)[0]
        else:
            w = torch.cat([m.weight.detach().float().cpu() for _, m in layers])  # (N, K)
            w = np.ascontiguousarray(w.numpy().T.astype(self.dtype))  # (K, N)
            y = g.node("MatMul", [x, g.weight(f"{prefix}.weight", w)], f"{name}/MatMul")[0]
        if any(m.bias is not None for _, m in layers):
            b = torch.cat([m.bias.detach().float().cpu() if m.bias is not None
                           else torch.zeros(m.out_features) for _, m in layers])
            bias = g.weight(f"{prefix}.bias", b.numpy().astype(self.dtype))
            y = g.node("Add", [y, bias], f"{name}/Add")[0]
        return y
