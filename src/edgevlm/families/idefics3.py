"""Idefics3 / SmolVLM (Idefics3ForConditionalGeneration + Idefics3Processor): a SigLIP-style
tower, a pixel-shuffle connector (scale factor s: s² neighbouring patch features become one
token, then one Linear without bias), a Llama decoder.

model_type `smolvlm` (SmolVLM2's SmolVLMForConditionalGeneration) is the same model under other
class names, with the same module paths, image recipe and prompt expansion: the family claims
both (SMOLVLM below). Its models carry an Idefics3Processor, because transformers'
SmolVLMProcessor cannot be built without torchvision (its video processor).

Images are split as SmolVLM's processor does it: the image is resized so that its longest
edge is `size.longest_edge` (a multiple of the tile size), cut into tiles of the encoder's size
(`max_image_size.longest_edge`) in rows and columns, and a global image (the whole image at
tile size) follows. One `<image>` becomes, per tile,
`<fake_token_around_image><row_r_col_c>` + (patches / s²) `<image>` tokens, a newline after
each row, then `\n<fake_token_around_image><global-img>` + tokens + `<fake_token_around_image>`;
with splitting off (or an image no larger than a tile), only the global image. The expansion
is the HF processor's own (`Idefics3Processor.replace_image_token`), so training, eval and the
torch bench see exactly what transformers users see.

Batches: pixel_values is (B, N_tiles, 3, H, W), one row per sample of the text batch (padded with
all-zero tiles, which the model drops), and pixel_attention_mask (B, N_tiles, H, W).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from edgevlm.errors import UserError
from edgevlm.families.base import Family, LoadedModel

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
MAX_GRID = 6  # Idefics3Processor knows <row_r_col_c> markers up to 6 x 6
MARKERS = [FAKE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE] + [
    f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]


def num_image_tokens(config, image_processor=None) -> int:
    """Image tokens per tile: the encoder's patches over scale_factor² (a tile is always the
    config's image_size, whatever the processor)."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2


def check_config(cfg: dict, where: str) -> None:
    """Reject an Idefics3Config dict whose sizes cannot work, naming the field."""
    vc, tc = cfg.get("vision_config"), cfg.get("text_config")
    if not isinstance(vc, dict) or not isinstance(tc, dict):
        raise UserError(f"{where}: an idefics3 config needs vision_config and text_config")
    if tc.get("model_type", "llama") != "llama":
        raise UserError(f"{where}: text_config.model_type {tc.get('model_type')!r} is not "
                        "supported for idefics3; use llama (SmolVLM's decoder is SmolLM2)")
    size, patch = vc.get("image_size", 224), vc.get("patch_size", 32)
    scale = cfg.get("scale_factor", 2)
    if size % patch:
        raise UserError(f"{where}: vision_config.image_size {size} is not a multiple of "
                        f"patch_size {patch}")
    if (size // patch) % scale:
        raise UserError(f"{where}: scale_factor {scale} does not divide the {size // patch} "
                        "patches per side; pick an image_size / patch_size it divides")


def image_processor_for(vision_config, splitting: bool = True, max_tiles_per_side: int = 2):
    """The image processor of this tower: tiles of the encoder's size, the longest edge resized
    to `max_tiles_per_side` tiles (SmolVLM-256M: 512-px tiles, 4 per side)."""
    from transformers import Idefics3ImageProcessorPil

    tile = vision_config.image_size
    return Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": tile * max_tiles_per_side},
        max_image_size={"longest_edge": tile}, do_image_splitting=splitting,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build(cfg: dict, tokenizer, seed: int, classes: tuple[str, str] = (
        "Idefics3Config", "Idefics3ForConditionalGeneration")):
    """A random Idefics3 (or, by `classes`, SmolVLM) model and its processor around `tokenizer`
    (given the image markers as special tokens), as a LoadedModel."""
    import torch
    import transformers
    from transformers import Idefics3Processor

    config_class, model_class = (getattr(transformers, c) for c in classes)

    check_config(cfg, "config")
    splitting = cfg.pop("do_image_splitting", True)
    tiles = cfg.pop("max_tiles_per_side", 2)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS + [IMAGE_TOKEN]},
                                 replace_extra_special_tokens=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg["text_config"]["vocab_size"] = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg["text_config"][key] = getattr(tokenizer, key)
    cfg["image_token_id"] = image_token_id
    # Idefics3 ties lm_head by its own top-level flag; follow the decoder's (SmolLM2 ties)
    cfg["tie_word_embeddings"] = cfg["text_config"].get("tie_word_embeddings", False)
    cfg["pad_token_id"] = tokenizer.pad_token_id
    try:
        config = config_class(**cfg)
    except (ValueError, TypeError) as e:
        raise UserError(f"config: {e}") from e
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = Idefics3Processor(image_processor_for(config.vision_config, splitting, tiles),
                                  tokenizer, image_seq_len=num_image_tokens(config),
                                  chat_template=tokenizer.chat_template)
    return LoadedModel(model, processor, image_token_id, num_image_tokens(config))


def expand_image(processor, n_tokens: int, image) -> str:
    """The text one `<image>` becomes for this image: tiles with row/column markers, then the
    global image, exactly as Idefics3Processor writes it."""
    if image is None:
        raise UserError("an idefics3 prompt with <image> needs the image to expand it")
    info = processor.image_processor([[image]], return_row_col_info=True)
    return processor.replace_image_token(info, 0)


def pixel_inputs(processor, images: list) -> dict:
    """{pixel_values (B, N_tiles, 3, H, W), pixel_attention_mask (B, N_tiles, H, W)}, one row per
    entry of `images` (None: a text-only sample, all-zero tiles the model drops); {} when no
    entry has an image."""
    import torch

    if all(im is None for im in images):
        return {}
    done = [None if im is None else processor.image_processor([[im]], return_tensors="pt")
            for im in images]
    shape = next(d["pixel_values"].shape for d in done if d is not None)  # (1, n, 3, H, W)
    tiles = max(d["pixel_values"].shape[1] for d in done if d is not None)
    values = torch.zeros((len(images), tiles, *shape[2:]))
    mask = torch.zeros((len(images), tiles, *shape[3:]), dtype=torch.bool)
    for i, d in enumerate(done):
        if d is not None:
            n = d["pixel_values"].shape[1]
            values[i, :n] = d["pixel_values"][0]
            mask[i, :n] = d["pixel_attention_mask"][0].bool()
    return {"pixel_values": values, "pixel_attention_mask": mask}


def image_features(model, inputs: dict):
    """(N_tokens, D_text): every image token's feature, in prompt order."""
    import torch

    out = model.get_image_features(**inputs)
    return torch.cat(list(out.pooler_output))


FAMILY = Family(
    name="idefics3",
    model_types=("idefics3",),
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    paths={"vision_tower": "model.vision_model", "connector": "model.connector",
           "language_model": "model.text_model", "lm_head": "lm_head", "backbone": "model"},
    num_image_tokens=num_image_tokens,
    image_features=image_features,
    build=build,
    expand_image=expand_image,
    pixel_inputs=pixel_inputs,
    check_config=check_config,
    image_token_key="image_token_id",
    expansion_needs_image=True,
    image_layout="tiles",
)

# SmolVLM2's classes (model_type smolvlm): the same parts, recipe and expansion.
SMOLVLM = replace(FAMILY, model_types=("smolvlm",), model_class="SmolVLMForConditionalGeneration",
                  build=partial(build, classes=("SmolVLMConfig",
                                                "SmolVLMForConditionalGeneration")))
