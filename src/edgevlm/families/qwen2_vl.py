"""Qwen2-VL and Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration +
Qwen2VLProcessor): a ViT of 14-px patches over frames of 2 (`temporal_patch_size`), 2-D rotary
positions in the tower, a patch merger (2 x 2 neighbouring patches become one token, an MLP to the
text width), and a Qwen2 decoder whose rotary is M-RoPE: three position streams (temporal,
height, width) whose frequencies are taken in sections (`mrope_section`).

Images keep their aspect ratio: the processor resizes each to a multiple of 28 px (patch x merge)
between `min_pixels` and `max_pixels` ("smart resize"), so the token count depends on the image:
one `<image>` becomes `<|vision_start|>` + (h/28)·(w/28) `<|image_pad|>` + `<|vision_end|>`.
pixel_values is (patches of all images, 3·2·14·14) with `image_grid_thw` (images, 3); the model
needs `mm_token_type_ids` (1 at image tokens) to lay out the three position streams.
Qwen2.5-VL's tower attends within windows of `window_size` px except in its
`fullatt_block_indexes` layers, and uses RMSNorm and a gated MLP; the rest is the same.

transformers' Qwen2VLProcessor cannot be built without torchvision (its video processor), so the
family builds and loads `ImageTextProcessor`, the same processor without video; the processor
files it saves name Qwen2VLProcessor, which transformers loads where torchvision is installed.
Video input is not supported yet.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from functools import partial

from edgevlm.errors import UserError
from edgevlm.families.base import Family, LoadedModel

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
MARKERS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
TEXT_TYPES = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text"}
DEFAULT_MAX_PIXELS = 12845056  # Qwen2VLImageProcessor's size.longest_edge


@functools.cache
def _processor_class():
    """Qwen2VLProcessor without its video processor (which needs torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageTextProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMAGE_PAD, VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self):
            return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    return ImageTextProcessor


def make_processor(image_processor, tokenizer, chat_template=None):
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=chat_template)


def load_processor(model_dir: str):
    """The processor of a model folder: its image processor and tokenizer (video left out)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for token in (IMAGE_PAD, VISION_START, VISION_END):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise UserError(f"{model_dir}: the tokenizer has no {token} token; a Qwen2-VL "
                            "tokenizer needs <|vision_start|>, <|image_pad|> and <|vision_end|>")
    return make_processor(Qwen2VLImageProcessorPil.from_pretrained(model_dir), tokenizer,
                          tokenizer.chat_template)


def _factor(image_processor) -> int:
    return image_processor.patch_size * image_processor.merge_size


def pixel_bounds(image_processor) -> tuple[int, int]:
    size = image_processor.size
    return size["shortest_edge"], size["longest_edge"]


def tokens_for(image_processor, width: int, height: int) -> int:
    """Image tokens of one image of this size, after the processor's smart resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    lo, hi = pixel_bounds(image_processor)
    try:
        h, w = smart_resize(height, width, factor=_factor(image_processor), min_pixels=lo,
                            max_pixels=hi)
    except ValueError as e:  # an aspect ratio over 200
        raise UserError(f"image of {width}x{height}: {e}; crop it nearer to square") from e
    return (h // _factor(image_processor)) * (w // _factor(image_processor))


MAX_PIXELS_BOUND = 4096 * 4096  # the runtime's largest resized image (runtime.limits)


def set_pixel_bounds(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize bounds for the processor (in place): each image is resized to a multiple of
    28 px with min_pixels <= h·w <= max_pixels."""
    lo, hi = pixel_bounds(processor.image_processor)
    lo, hi = min_pixels or lo, max_pixels or hi
    for name, value in (("--min-pixels", lo), ("--max-pixels", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or not \
                _factor(processor.image_processor) ** 2 <= value <= MAX_PIXELS_BOUND:
            raise UserError(f"{name} {value} must be an integer from one merged patch "
                            f"({_factor(processor.image_processor) ** 2} px) to {MAX_PIXELS_BOUND}")
    if lo > hi:
        raise UserError(f"--min-pixels {lo} is over --max-pixels {hi}; give min <= max")
    processor.image_processor.size = {"shortest_edge": lo, "longest_edge": hi}


def max_image_tokens(processor) -> int:
    """The most tokens one image can become: max_pixels over one merged token's pixels."""
    ip = processor.image_processor
    return pixel_bounds(ip)[1] // _factor(ip) ** 2


def num_image_tokens(config) -> int:
    """Without a processor: the tokens of an image at the default max_pixels (an upper bound
    for the default processor; a model's own processor gives `max_image_tokens`)."""
    vc = config.vision_config
    return DEFAULT_MAX_PIXELS // (vc.patch_size * vc.spatial_merge_size) ** 2


def expand_image(processor, n_tokens: int, image) -> str:
    """`<|vision_start|>`, one `<|image_pad|>` per merged patch of this image, `<|vision_end|>`."""
    if image is None:
        raise UserError("a qwen2_vl prompt with <image> needs the image to expand it")
    count = tokens_for(processor.image_processor, *image.size)
    return VISION_START + IMAGE_PAD * count + VISION_END


def pixel_inputs(processor, images: list) -> dict:
    """{pixel_values (patches of every image, C·T·P·P), image_grid_thw (images, 3)} for the
    samples that have an image, in order; {} when none has."""
    present = [im for im in images if im is not None]
    if not present:
        return {}
    out = processor.image_processor(images=present, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def text_inputs(processor, input_ids) -> dict:
    """What the model needs beside the ids to place its M-RoPE positions: which tokens are
    image tokens (1) and which text (0)."""
    return {"mm_token_type_ids": (input_ids == processor.image_token_id).int()}


def rope_index(model, input_ids, inputs: dict, processor):
    """(position_ids (3, B, S), rope delta (B, 1)) of a prompt with these pixel inputs: the
    model's own M-RoPE layout (get_rope_index)."""
    return model.model.get_rope_index(input_ids, image_grid_thw=inputs.get("image_grid_thw"),
                                      **text_inputs(processor, input_ids))


def image_features(model, inputs: dict):
    """(N_tokens, D_text): every image token's feature, in prompt order."""
    import torch

    out = model.get_image_features(pixel_values=inputs["pixel_values"],
                                   image_grid_thw=inputs["image_grid_thw"])
    return torch.cat(list(out.pooler_output))


LM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
           "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
           "initializer_range")


def text_config_from(lm: dict, kind: str = "qwen2_vl_text") -> dict:
    """A Llama or Qwen2 LM's config as Qwen2-VL's decoder: the same sizes, norms and rotary
    base, with M-RoPE sections in Qwen2-VL's proportions (2:3:3 of head_dim / 2). Its q/k/v
    biases start at zero (models.text_lm.graft), so text tokens, whose three position streams
    are equal, get exactly the LM's logits."""
    if lm.get("model_type") not in ("llama", "qwen2"):
        raise UserError(f"--text-from: a {lm.get('model_type')!r} LM cannot become a Qwen2-VL "
                        "decoder; give a llama or qwen2 LM")
    if lm.get("attention_bias") or lm.get("mlp_bias"):
        raise UserError("--text-from: the LM has attention or MLP output biases, which Qwen2-VL's "
                        "decoder lacks; give an LM without them")
    head_dim = lm.get("head_dim") or lm["hidden_size"] // lm["num_attention_heads"]
    if head_dim * lm["num_attention_heads"] != lm["hidden_size"] or head_dim % 16:
        raise UserError(f"--text-from: head_dim {head_dim} must be hidden_size / heads and a "
                        "multiple of 16 for M-RoPE's 2:3:3 sections")
    params = lm.get("rope_parameters") or {"rope_type": "default",
                                           "rope_theta": lm.get("rope_theta", 10000.0)}
    if params.get("rope_type", "default") != "default":
        raise UserError(f"--text-from: rope type {params.get('rope_type')!r} has no M-RoPE form; "
                        "give an LM with plain rotary positions")
    quarter = head_dim // 8
    out = {k: lm[k] for k in LM_KEYS if lm.get(k) is not None}
    return {**out, "model_type": kind, "rope_parameters": {
        "rope_type": "default", "rope_theta": params["rope_theta"],
        "mrope_section": [quarter, 3 * head_dim // 16, 3 * head_dim // 16]}}


def check_config(cfg: dict, where: str) -> None:
    """Reject a Qwen2-VL config dict whose sizes cannot work, naming the field."""
    vc, tc = cfg.get("vision_config"), cfg.get("text_config")
    if not isinstance(vc, dict) or not isinstance(tc, dict):
        raise UserError(f"{where}: a qwen2_vl config needs vision_config and text_config")
    heads, width = tc.get("num_attention_heads", 1), tc.get("hidden_size", 1)
    if width % heads:
        raise UserError(f"{where}: text_config.hidden_size {width} is not divisible by "
                        f"num_attention_heads {heads}; pick sizes that divide")
    head_dim = tc.get("head_dim") or width // heads
    section = (tc.get("rope_parameters") or tc.get("rope_scaling") or {}).get("mrope_section")
    if section is not None and 2 * sum(section) != head_dim:
        raise UserError(f"{where}: text_config mrope_section {section} sums to {sum(section)}, "
                        f"not head_dim/2 = {head_dim // 2}; give sections that sum to it")
    v_heads = vc.get("num_heads", 1)
    v_width = vc.get("embed_dim", vc.get("hidden_size", 1))
    if v_width % v_heads or (v_width // v_heads) % 4:
        raise UserError(f"{where}: vision width {v_width} over num_heads {v_heads} must be a "
                        "multiple of 4 (the 2-D rotary splits each head in four)")
    if "video" in str(cfg.get("input_modalities", "")):
        raise UserError(f"{where}: video input is not supported yet; use images")


def image_processor_for(min_pixels: int, max_pixels: int, vision_config):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        merge_size=vision_config.spatial_merge_size)


def _merger_width(cfg: dict, key: str) -> None:
    """The patch merger writes the decoder's width (vision_config[key]: Qwen2-VL's hidden_size,
    Qwen2.5-VL's out_hidden_size): set it from the text config, or refuse a different one."""
    width, vc = cfg["text_config"].get("hidden_size"), cfg["vision_config"]
    if width is None:
        return
    if vc.get(key, width) != width:
        raise UserError(f"config: vision_config.{key} {vc[key]} is the merger's output width and "
                        f"must equal text_config.hidden_size {width}; set both alike")
    vc[key] = width


def build(cfg: dict, tokenizer, seed: int, classes: tuple[str, str] = (
        "Qwen2VLConfig", "Qwen2VLForConditionalGeneration")):
    """A random Qwen2-VL (or, by `classes`, Qwen2.5-VL) and its processor around `tokenizer`
    (given the vision markers as special tokens), as a LoadedModel. The preset's `min_pixels` /
    `max_pixels` go to the image processor."""
    import torch
    import transformers

    config_class, model_class = (getattr(transformers, c) for c in classes)
    check_config(cfg, "config")
    lo, hi = cfg.pop("min_pixels", 56 * 56), cfg.pop("max_pixels", DEFAULT_MAX_PIXELS)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS},
                                 replace_extra_special_tokens=False)
    ids = dict(zip(MARKERS, tokenizer.convert_tokens_to_ids(MARKERS), strict=True))
    tc = cfg["text_config"]
    _merger_width(cfg, "out_hidden_size" if "2_5" in classes[0] else "hidden_size")
    tc["vocab_size"] = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tc[key] = getattr(tokenizer, key)
    cfg.update(image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
               vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
               tie_word_embeddings=tc.get("tie_word_embeddings", False))
    try:
        config = config_class(**cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"config: {e}") from e
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = make_processor(image_processor_for(lo, hi, config.vision_config), tokenizer,
                               tokenizer.chat_template)
    return LoadedModel(model, processor, ids[IMAGE_PAD], max_image_tokens(processor))


def vision_graph(model):
    """The module the exporter traces for the vision encoder (edgevlm.families.qwen2_vl_graph)."""
    from edgevlm.families.qwen2_vl_graph import PatchVisionEncoder

    return PatchVisionEncoder(model)


def patch_kind(config) -> str:
    """"windowed" for a tower with window-attention layers (Qwen2.5-VL), else "full"."""
    vc = getattr(config, "vision_config", config)
    full = getattr(vc, "fullatt_block_indexes", None)
    return "windowed" if full is not None and len(full) < vc.depth else "full"


FAMILY = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    processor_class="Qwen2VLProcessor",
    paths={"vision_tower": "model.visual", "connector": "model.visual.merger",
           "language_model": "model.language_model", "lm_head": "lm_head", "backbone": "model"},
    num_image_tokens=num_image_tokens,
    image_features=image_features,
    build=build,
    expand_image=expand_image,
    pixel_inputs=pixel_inputs,
    check_config=check_config,
    image_token_key="image_token_id",
    # transformers saves Qwen2-VL under the original checkpoints' names (model.layers.*,
    # visual.*); names already in the module layout map to themselves
    legacy_keys=(("model.language_model.", "model.language_model."),
                 ("model.visual.", "model.visual."),
                 ("visual.", "model.visual."),
                 ("model.", "model.language_model.")),
    expansion_needs_image=True,
    image_layout="patches",
    positions="mrope",
    text_inputs=text_inputs,
    load_processor=load_processor,
    max_image_tokens=max_image_tokens,
    vision_graph=vision_graph,
    patch_kind=patch_kind,
    rope_index=rope_index,
    moe_text=False,
    text_config_from=text_config_from,
    set_pixel_bounds=set_pixel_bounds,
)

QWEN2_5_VL = replace(FAMILY, name="qwen2_5_vl", model_types=("qwen2_5_vl",),
                     model_class="Qwen2_5_VLForConditionalGeneration",
                     build=partial(build, classes=("Qwen2_5_VLConfig",
                                                   "Qwen2_5_VLForConditionalGeneration")),
                     text_config_from=partial(text_config_from, kind="qwen2_5_vl_text"))
