"""What the builder needs to know of a text model, and whether it can build it.

The builder covers the decoder-only families whose layer is RMSNorm -> attention (RoPE, grouped
KV heads) -> RMSNorm -> SwiGLU MLP, with residual adds: Llama and Qwen2 as transformers writes
them (`LlamaDecoderLayer`, `Qwen2DecoderLayer`). Anything else is reported as a reason string,
which the exporter turns into a fallback to the traced decoder or, when the builder was asked
for by name, into a UserError.

Rotary tables: the cos/sin caches GroupQueryAttention reads (do_rotary=1) are made from the
model's own rotary module (`inv_freq`, `attention_scaling`), computed as transformers computes
them in float32, so every rope type whose frequencies do not depend on the sequence length
(default, linear, llama3, yarn) is exact; dynamic NTK and longrope change with the length and
are refused.

M-RoPE (Qwen2-VL, Qwen2.5-VL; Wang et al. 2024, "Qwen2-VL", section 2.1): the same Qwen2 layer,
but its rotary position is three streams (temporal, height, width), and each of the head_dim / 2
frequencies takes its angle from one stream: `mrope_section` (e.g. [16, 24, 24]) splits the
frequencies into consecutive runs, run i reading stream i % 3. For text the three streams are
equal and it is the ordinary RoPE. The graph then has a `position_ids` input (mrope.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.families.backbones import (
    DENSE_TEXT_TYPES,
    MOE_TEXT_TYPES,
    MROPE_TEXT_TYPES,
    is_moe,
    mrope_section,
    o_bias,
    qkv_bias,
)

FAMILIES = DENSE_TEXT_TYPES + MOE_TEXT_TYPES + MROPE_TEXT_TYPES  # the decoders it writes
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # length-independent frequencies
HEAD_MULTIPLE = 16  # GroupQueryAttention with rotary caches: head_size % 16 == 0


@dataclass(frozen=True)
class TextSpec:
    """Sizes and options of one decoder, read from its transformers config."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    attention_bias: bool  # q/k/v biases (Qwen2 always; Llama if attention_bias)
    o_bias: bool  # o_proj bias (Llama attention_bias)
    mlp_bias: bool
    tied: bool  # lm_head shares the embedding table
    rope_type: str
    max_positions: int
    num_experts: int = 0  # qwen2_moe: experts per MoE layer (0: a dense decoder)
    top_k: int = 0
    norm_topk: bool = False  # renormalise the top-k router probabilities
    moe_intermediate_size: int = 0
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: frequencies per position stream


def _rope_type(tc) -> str:
    params = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def unsupported(tc) -> str | None:
    """Why the builder cannot write the decoder of text config `tc`, or None if it can."""
    kind = tc.model_type
    if kind not in FAMILIES:
        return (f"the decoder builder covers text models {', '.join(FAMILIES)}, not "
                f"{kind!r}")
    rope = _rope_type(tc)
    if rope not in ROPE_TYPES:
        return (f"rope type {rope!r} is not implemented by the decoder builder (it knows "
                f"{', '.join(ROPE_TYPES)})")
    if getattr(tc, "hidden_act", "silu") != "silu":
        return f"hidden_act {tc.hidden_act!r}: the builder's MLP is SwiGLU (silu)"
    layer_types = set(getattr(tc, "layer_types", None) or ["full_attention"])
    if getattr(tc, "use_sliding_window", False) or layer_types != {"full_attention"}:
        return "sliding-window attention layers are not implemented by the decoder builder"
    if getattr(tc, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings are not implemented by the decoder builder"
    if is_moe(tc) and getattr(tc, "shared_expert_intermediate_size", 0):
        return ("Qwen2-MoE's shared expert is not implemented by the decoder builder (edgevlm's "
                "upcycled students have none: shared_expert_intermediate_size 0)")
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    if head_dim % HEAD_MULTIPLE:
        return (f"head size {head_dim} (hidden_size / num_attention_heads) is not a multiple of "
                f"{HEAD_MULTIPLE}, which onnxruntime's GroupQueryAttention with rotary needs")
    section = mrope_section(tc)
    if section is not None and (sum(section) != head_dim // 2 or min(section) <= 0):
        return (f"rope_parameters mrope_section {list(section)} must be positive and sum to "
                f"head_dim / 2 = {head_dim // 2}")
    return None


def text_spec(tc) -> TextSpec:
    """The TextSpec of a supported text config (check `unsupported` first)."""
    assert unsupported(tc) is None, unsupported(tc)
    heads = tc.num_attention_heads
    moe = is_moe(tc)
    return TextSpec(
        model_type=tc.model_type, num_layers=tc.num_hidden_layers, hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size, num_heads=heads,
        num_kv_heads=tc.num_key_value_heads or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab_size=tc.vocab_size, rms_eps=float(tc.rms_norm_eps),
        attention_bias=qkv_bias(tc), o_bias=o_bias(tc),
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tied=bool(getattr(tc, "tie_word_embeddings", False)), rope_type=_rope_type(tc),
        max_positions=tc.max_position_embeddings,
        num_experts=tc.num_experts if moe else 0, top_k=tc.num_experts_per_tok if moe else 0,
        norm_topk=bool(getattr(tc, "norm_topk_prob", False)) and moe,
        moe_intermediate_size=tc.moe_intermediate_size if moe else 0,
        mrope_section=mrope_section(tc))


def rotary_caches(rotary_emb, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (length, head_dim / 2) float32 for positions 0..length-1, as transformers'
    rotary module computes them (float32 outer product, then cos/sin times attention_scaling);
    GroupQueryAttention (rotary_interleaved=0) reads the first half, the rotate_half layout."""
    import torch

    inv_freq = rotary_emb.inv_freq.detach().float().cpu()  # (head_dim / 2,)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (length, head_dim / 2)
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
    return ((freqs.cos() * scaling).numpy().astype(np.float32),
            (freqs.sin() * scaling).numpy().astype(np.float32))
