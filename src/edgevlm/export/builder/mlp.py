"""The SwiGLU feed-forward block of Llama / Qwen2: down(silu(gate(x)) · up(x)).

    normed (B, S, D)
      ├──────────────── gate_proj MatMul[NBits] ─┬─ Sigmoid ─┐
      │                                          └───────── Mul   silu(gate)
      └─ up_proj MatMul[NBits] ──────────────────────────── Mul   silu(gate) · up
                                                             │
                                                  down_proj MatMul[NBits]   (B, S, D)

SiLU is written Sigmoid · x because onnxruntime has no fused SiLU kernel; its graph optimizer
keeps the pair cheap.
"""

from __future__ import annotations

import numpy as np

from edgevlm.export.builder.graph import MS_DOMAIN, Graph


def mlp(g: Graph, layer: int, x: str, module, linears, spec=None) -> str:
    """One layer's MLP from `module` (LlamaMLP / Qwen2MLP, or a sparse MoE block: `moe`);
    returns (B, S, D)."""
    if is_moe_block(module):
        return moe(g, layer, x, module, spec, linears)
    name = f"/model/layers.{layer}/mlp"
    key = f"text.layers.{layer}.mlp"

    def proj(p: str, inp: str) -> str:
        return linears(g, inp, f"{name}/{p}", f"model.layers.{layer}.mlp.{p}",
                       [(f"{key}.{p}.weight", getattr(module, p))])

    gate = proj("gate_proj", x)
    sig = g.node("Sigmoid", [gate], f"{name}/act_fn/Sigmoid")[0]
    silu = g.node("Mul", [gate, sig], f"{name}/act_fn/Mul")[0]
    up = proj("up_proj", x)
    both = g.node("Mul", [silu, up], f"{name}/Mul")[0]
    return proj("down_proj", both)


def is_moe_block(module) -> bool:
    """A sparse MoE FFN (transformers' Qwen2-MoE block: router `gate`, fused `experts`)."""
    return hasattr(module, "experts") and hasattr(module, "gate")


def interleave(gate_up: np.ndarray, inter: int) -> np.ndarray:
    """(E, 2I, ...) rows [gate | up] -> rows gate_0, up_0, gate_1, up_1, ...: the fused SwiGLU
    layout (swiglu_fusion=1) that onnxruntime's CPU MoE kernels read."""
    out = np.empty_like(gate_up)
    out[:, 0::2], out[:, 1::2] = gate_up[:, :inter], gate_up[:, inter:]
    return out


def moe(g: Graph, layer: int, x: str, module, spec, linears) -> str:
    """One layer's sparse MoE FFN as onnxruntime's MoE op (float) or QMoE (int4 / int8):

        normed (B, S, D) ── router MatMul (D, E) ── Reshape (B·S, E): logits
        MoE / QMoE(normed, logits; fc1 = [gate|up] interleaved (E, 2I, D), fc2 = down (E, D, I))
            softmax over the E logits, top-k, renormalised when the model renormalises
            (normalize_routing_weights), silu(gate) · up (swiglu, alpha 1, beta 0) ── (B, S, D)

    Each expert is Qwen2-MoE's gate_up_proj / down_proj; the router stays float in every
    precision (E × D weights)."""
    name = f"/model/layers.{layer}/moe"
    prefix = f"model.layers.{layer}.moe"
    key = f"text.layers.{layer}.mlp.experts"
    experts, inter = spec.num_experts, spec.moe_intermediate_size
    router = module.gate.weight.detach().float().cpu().numpy()  # (E, D)
    logits = g.node("MatMul", [x, g.weight(f"{prefix}.router.weight",
                                           np.ascontiguousarray(router.T.astype(linears.dtype)))],
                    f"{name}/router/MatMul")[0]
    logits = g.node("Reshape", [logits, g.constant([-1, experts])], f"{name}/router/Reshape")[0]
    attrs = dict(k=spec.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                 activation_beta=0.0, normalize_routing_weights=int(spec.norm_topk))
    if linears.weights is None:
        gate_up = module.experts.gate_up_proj.detach().float().cpu().numpy()
        down = module.experts.down_proj.detach().float().cpu().numpy()
        fc1 = g.weight(f"{prefix}.fc1.weight", interleave(gate_up, inter).astype(linears.dtype))
        fc2 = g.weight(f"{prefix}.fc2.weight", down.astype(linears.dtype))
        return g.node("MoE", [x, logits, fc1, "", fc2], f"{name}/MoE", domain=MS_DOMAIN,
                      **attrs)[0]
    w1, w2 = linears.weights[f"{key}.gate_up_proj"], linears.weights[f"{key}.down_proj"]
    bits, block = w1[0].bits, w1[0].block_size
    q1, s1, z1 = (interleave(np.stack([getattr(w, f) for w in w1]), inter)
                  for f in ("q", "scales", "zero_points"))
    q2, s2, z2 = (np.stack([getattr(w, f) for w in w2]) for f in ("q", "scales", "zero_points"))
    inputs = [x, logits]
    for n, q, s in (("fc1", q1, s1), ("fc2", q2, s2)):
        inputs += [g.weight(f"{prefix}.{n}.qweight", pack(q, bits)),
                   g.weight(f"{prefix}.{n}.scales", s.astype(linears.dtype)), ""]
    inputs += ["", "", ""]  # fc3 weights, scales, bias: none (gate and up are fused in fc1)
    inputs += [g.weight(f"{prefix}.fc1.zero_points", pack(z1, bits)),
               g.weight(f"{prefix}.fc2.zero_points", pack(z2, bits))]
    return g.node("QMoE", inputs, f"{name}/QMoE", domain=MS_DOMAIN, expert_weight_bits=bits,
                  block_size=block, accuracy_level=linears.accuracy_level, **attrs)[0]


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values along the last axis, two 4-bit values per byte (low nibble first, an odd
    count padded with 0) for bits=4; as they are for bits=8."""
    q = np.ascontiguousarray(q.astype(np.uint8))
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
