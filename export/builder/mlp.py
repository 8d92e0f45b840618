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

from edgevlm.export.builder.graph import Graph


def mlp(g: Graph, layer: int, x: str, module, linears) -> str:
    """One layer's MLP from `module` (LlamaMLP / Qwen2MLP); returns (B, S, D)."""
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
