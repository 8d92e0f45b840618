"""LLaVA (LlavaForConditionalGeneration + LlavaProcessor): a CLIP or SigLIP tower, a two-layer
MLP projector, a Llama or Qwen2 decoder; one `<image>` becomes a fixed run of image tokens, one
per patch (plus CLS for CLIP unless the `default` strategy drops it); 1-D positions."""

from __future__ import annotations

from edgevlm.families import Family

IMAGE_TOKEN = "<image>"


def num_image_tokens(config) -> int:
    """Image tokens per image, as LlavaProcessor expands `<image>`."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if vc.model_type == "clip_vision_model":
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


def build(cfg: dict, tokenizer, seed: int):
    from edgevlm.models import init_llava

    return init_llava(cfg, tokenizer, seed)


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
    from edgevlm.models import check_config as check

    check(cfg, where)


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    config_class="LlavaConfig",
    processor_class="LlavaProcessor",
    image_processor_class=None,
    paths={"vision_tower": "model.vision_tower", "connector": "model.multi_modal_projector",
           "language_model": "model.language_model", "lm_head": "lm_head", "backbone": "model"},
    position_ids="1d",
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
