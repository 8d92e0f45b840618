"""RMSNorm as onnxruntime's fused contrib ops, with the residual add folded in.

A decoder layer's two norms and the residual adds between them become one op each:

    first layer's input_layernorm          every later norm (post-attention, the next layer's
                                           input norm, the final norm)
      x                                        x (branch output)   residual
      │                                            │                  │
      SimplifiedLayerNormalization             SkipSimplifiedLayerNormalization
      (gamma, epsilon)                         (gamma, epsilon)
      │                                            │                  │
      normed                                   normed (output 0)   x + residual (output 3):
                                               the residual stream the next norm skips with

Both compute y = x / sqrt(mean(x²) + eps) · gamma with float32 statistics (stash_type=1), as
transformers' LlamaRMSNorm / Qwen2RMSNorm do.
"""

from __future__ import annotations

from edgevlm.export.builder.graph import MS_DOMAIN, Graph


def _gamma(g: Graph, key: str, weight, dtype) -> str:
    return g.weight(key, weight.detach().float().cpu().numpy().astype(dtype))


def rms_norm(g: Graph, x: str, name: str, key: str, weight, eps: float, dtype) -> str:
    """SimplifiedLayerNormalization `<name>/LayerNorm`; returns the normed output."""
    return g.node("SimplifiedLayerNormalization", [x, _gamma(g, key, weight, dtype)],
                  f"{name}/LayerNorm", axis=-1, epsilon=eps, stash_type=1)[0]


def skip_rms_norm(g: Graph, x: str, residual: str, name: str, key: str, weight, eps: float,
                  dtype) -> tuple[str, str]:
    """SkipSimplifiedLayerNormalization `<name>/SkipLayerNorm`; returns (normed, x + residual)."""
    out = g.node("SkipSimplifiedLayerNormalization", [x, residual, _gamma(g, key, weight, dtype)],
                 f"{name}/SkipLayerNorm", outputs=[f"{name}/output_0", "", "",
                                                   f"{name}/output_3"],
                 domain=MS_DOMAIN, epsilon=eps)
    return out[0], out[3]

