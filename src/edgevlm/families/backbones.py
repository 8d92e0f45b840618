"""The vision towers and text decoders the families are assembled from, and what differs between
them: the one place that reads a tower's or a decoder's model_type (the export builder, the MoE
upcycler and the text-LM graft ask here)."""

from __future__ import annotations

VISION_MODEL_TYPES = ("siglip_vision_model", "clip_vision_model", "dinov2")
CLS_VISION_TYPES = ("clip_vision_model", "dinov2")
# towers that resize their position grid to whatever size they are given (DINOv2's bicubic
# interpolation): the image size their processor makes, not the config's, sets the patch count
INTERPOLATING_VISION_TYPES = ("dinov2",)
DENSE_TEXT_TYPES = ("llama", "qwen2")
MOE_TEXT_TYPES = ("qwen2_moe",)
MROPE_TEXT_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")  # Qwen2 decoders with M-RoPE positions
TEXT_MODEL_TYPES = ("qwen2", "llama", "qwen2_moe")


def _model_type(config) -> str | None:
    return config.get("model_type") if isinstance(config, dict) else config.model_type


def has_cls_token(vision_config) -> bool:
    """Whether the tower puts a CLS token before its patches (CLIP and DINOv2 do, SigLIP does
    not)."""
    return _model_type(vision_config) in CLS_VISION_TYPES


def input_side(vision_config, image_processor=None) -> int | None:
    """The side of the square images the tower sees. A tower that interpolates its position grid
    (DINOv2) sees what its processor makes: facebook/dinov2-small's config says 518 (the grid it
    was trained at, 37x37) while its processor crops 224 (16x16 patches). The others see their
    config's image_size, which their processor makes (None for a tower without one: Qwen2-VL's
    takes each image at its own size)."""
    size = (vision_config.get("image_size") if isinstance(vision_config, dict)
            else getattr(vision_config, "image_size", None))
    if image_processor is None or _model_type(vision_config) not in INTERPOLATING_VISION_TYPES:
        return size
    made = processor_side(image_processor)
    return size if made is None else made


def processor_side(image_processor) -> int | None:
    """The side of the square images an HF image processor makes (its crop, else its
    height x width resize); None when their size follows each image's."""
    get = image_processor.get if isinstance(image_processor, dict) else \
        lambda k: getattr(image_processor, k, None)
    size = get("crop_size") if get("do_center_crop") else get("size")
    size = dict(size) if size is not None and not isinstance(size, int) else size
    if isinstance(size, int):
        return size
    if size and size.get("height") is not None and size.get("height") == size.get("width"):
        return int(size["height"])
    return None


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
