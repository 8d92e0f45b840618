"""The vision towers and text decoders the families are assembled from, and what differs between
them: the one place that reads a tower's or a decoder's model_type (the export builder, the MoE
upcycler and the text-LM graft ask here)."""

from __future__ import annotations

VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model")
DENSE_TEXT_TYPES = ("llama", "qwen2")
MOE_TEXT_TYPES = ("qwen2_moe",)
MROPE_TEXT_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")  # Qwen2 decoders with M-RoPE positions
TEXT_MODEL_TYPES = ("qwen2", "llama", "qwen2_moe")


def _model_type(config) -> str | None:
    return config.get("model_type") if isinstance(config, dict) else config.model_type


def has_cls_token(vision_config) -> bool:
    """Whether the tower puts a CLS token before its patches (CLIP does, SigLIP does not)."""
    return _model_type(vision_config) == "clip_vision_model"


def is_moe(text_config) -> bool:
    """Whether the decoder is a sparse mixture of experts (Qwen2-MoE)."""
    return _model_type(text_config) in MOE_TEXT_TYPES


def qkv_bias(text_config) -> bool:
    """Whether q, k and v projections carry biases: always in Qwen2 (and Qwen2-VL's decoder), by
    `attention_bias` in Llama, by `qkv_bias` (default on) in Qwen2-MoE."""
    if getattr(text_config, "attention_bias", False):
        return True
    if is_moe(text_config):
        return bool(getattr(text_config, "qkv_bias", True))
    return _model_type(text_config) in ("qwen2", *MROPE_TEXT_TYPES)


def o_bias(text_config) -> bool:
    """Whether the attention output projection carries a bias (a Llama with attention_bias)."""
    return bool(getattr(text_config, "attention_bias", False)) and \
        _model_type(text_config) == "llama"


def mrope_section(text_config) -> tuple[int, ...] | None:
    """The M-RoPE sections of a Qwen2-VL / 2.5-VL decoder (transformers' default (16, 24, 24)
    when its rope_parameters name none); None for a decoder with 1-D positions."""
    if _model_type(text_config) not in MROPE_TEXT_TYPES:
        return None
    get = text_config.get if isinstance(text_config, dict) else \
        lambda k: getattr(text_config, k, None)
    params = get("rope_parameters") or get("rope_scaling") or {}
    return tuple(int(s) for s in params.get("mrope_section") or (16, 24, 24))
