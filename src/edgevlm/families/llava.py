"""LLaVA (LlavaForConditionalGeneration + LlavaProcessor): a CLIP, SigLIP or DINOv2 tower, a
two-layer MLP projector, a Llama or Qwen2 decoder; one `<image>` becomes a fixed run of image
tokens, one per patch of the image the processor makes (plus CLS for CLIP and DINOv2 unless the
`default` strategy drops it); 1-D positions."""

from __future__ import annotations

from edgevlm.errors import UserError
from edgevlm.families.backbones import (
    TEXT_MODEL_TYPES,
    VISION_MODEL_TYPES,
    has_cls_token,
    input_side,
)
from edgevlm.families.base import Family, LoadedModel

IMAGE_TOKEN = "<image>"
# What facebook/dinov2-* ship (BitImageProcessor): the shortest edge to 256, a 224 centre crop,
# bicubic, ImageNet statistics. Their config's image_size (518) is the position grid the tower
# was trained at, which it interpolates to the 224 crop's 16x16 patches.
DINOV2_CROP, DINOV2_RESIZE = 224, 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def num_image_tokens(config, image_processor=None) -> int:
    """Image tokens per image, as LlavaProcessor expands `<image>`: one per patch of the image
    the tower sees (the processor's, for a tower that interpolates its positions: DINOv2)."""
    vc = config.vision_config
    n = (input_side(vc, image_processor) // vc.patch_size) ** 2
    if has_cls_token(vc):
        n += 1  # CLS
    if config.vision_feature_select_strategy == "default":
        n -= 1  # drop CLS
    return n


def image_features(model, inputs: dict):
    """{pixel_values (B, 3, H, W)} -> (B, N_img, D_text), as the model itself makes them."""
    import torch

    out = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = getattr(out, "pooler_output", out)
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def image_processor_for(vision_config):
    """The HF image processor a LLaVA checkpoint of this vision tower ships with."""
    size = vision_config.image_size
    if vision_config.model_type == "dinov2":
        from transformers import BitImageProcessorPil

        return BitImageProcessorPil(size={"shortest_edge": DINOV2_RESIZE},
                                    crop_size={"height": DINOV2_CROP, "width": DINOV2_CROP},
                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    if has_cls_token(vision_config):
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


def build(cfg: dict, tokenizer, seed: int = 0) -> LoadedModel:
    """A random LlavaForConditionalGeneration and LlavaProcessor around `tokenizer`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_config(cfg, "config")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise UserError("the tokenizer has no <image> token; build it with edgevlm init "
                        "--tokenizer-data or add <image> as a special token")
    vocab = len(tokenizer)
    cfg["text_config"]["vocab_size"] = vocab
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg["text_config"][key] = getattr(tokenizer, key)
    cfg["image_token_index"] = image_token_id
    try:
        config = LlavaConfig(**cfg)
    except (ValueError, TypeError) as e:  # transformers' own checks (rope dims, unknown keys)
        raise UserError(f"config: {e}") from e
    images = image_processor_for(config.vision_config)
    config.image_seq_length = num_image_tokens(config, images)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(has_cls_token(config.vision_config)),
        chat_template=tokenizer.chat_template,
    )
    return LoadedModel(model, processor, image_token_id, config.image_seq_length)


def use_image_processor(loaded: LoadedModel, image_processor) -> LoadedModel:
    """`loaded` with `image_processor` (a pretrained tower's own, `init --vision-from`) and the
    image-token count it gives: a tower that interpolates its positions sees what it makes."""
    from transformers import LlavaProcessor

    old = loaded.processor
    config = loaded.model.config
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=old.tokenizer, patch_size=old.patch_size,
        vision_feature_select_strategy=old.vision_feature_select_strategy,
        num_additional_image_tokens=old.num_additional_image_tokens,
        chat_template=old.chat_template)
    config.image_seq_length = num_image_tokens(config, image_processor)
    return LoadedModel(loaded.model, processor, loaded.image_token_id, config.image_seq_length)


def expand_image(processor, n_tokens: int, image) -> str:
    """A fixed run of image tokens, whatever the image."""
    return IMAGE_TOKEN * n_tokens


def pixel_inputs(processor, images: list) -> dict:
    """{pixel_values (N_images, 3, H, W)}: one row per sample that has an image; {} for none."""
    present = [im for im in images if im is not None]
    if not present:
        return {}
    return {"pixel_values": processor.image_processor(images=present,
                                                      return_tensors="pt")["pixel_values"]}


def check_config(cfg: dict, where: str) -> None:
    """Reject a LlavaConfig dict whose sizes cannot work, naming the field."""
    for sub_name, allowed in (("vision_config", VISION_MODEL_TYPES),
                              ("text_config", TEXT_MODEL_TYPES)):
        sub = cfg.get(sub_name)
        if not isinstance(sub, dict):
            raise UserError(f"{where}: {sub_name} is missing; give a {sub_name} with a model_type")
        if sub.get("model_type") not in allowed:
            raise UserError(f"{where}: {sub_name}.model_type {sub.get('model_type')!r} is not "
                            f"supported; use one of {', '.join(allowed)}")
        heads = sub.get("num_attention_heads", 1)
        if sub.get("hidden_size", heads) % heads:
            raise UserError(f"{where}: {sub_name}.hidden_size {sub['hidden_size']} is not "
                            f"divisible by num_attention_heads {heads}; pick sizes that divide")
        kv = sub.get("num_key_value_heads")
        if kv and heads % kv:
            raise UserError(f"{where}: {sub_name}.num_attention_heads {heads} is not divisible by "
                            f"num_key_value_heads {kv}; pick sizes that divide")
    vc = cfg["vision_config"]
    if vc.get("image_size", 224) % vc.get("patch_size", 16):
        raise UserError(f"{where}: vision_config.image_size {vc.get('image_size')} is not "
                        f"divisible by patch_size {vc.get('patch_size')}")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UserError(f"{where}: vision_feature_select_strategy {strategy!r} must be "
                        "'default' (drop CLS) or 'full'")
    if strategy == "default" and not has_cls_token(vc):
        raise UserError(f"{where}: strategy 'default' drops a CLS token that SigLIP does not have; "
                        "use vision_feature_select_strategy 'full'")


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    paths={"vision_tower": "model.vision_tower", "connector": "model.multi_modal_projector",
           "language_model": "model.language_model", "lm_head": "lm_head", "backbone": "model"},
    num_image_tokens=num_image_tokens,
    image_features=image_features,
    build=build,
    expand_image=expand_image,
    pixel_inputs=pixel_inputs,
    check_config=check_config,
    image_token_key="image_token_index",
    # transformers 4.x saved LLaVA as language_model.model.* / language_model.lm_head.*
    legacy_keys=(("language_model.lm_head.", "lm_head."),
                 ("language_model.model.", "model.language_model."),
                 ("vision_tower.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector.")),
)
