"""What every family file builds on: the `Family` record and the `LoadedModel` a family's
`build` and the loaders return. Imports nothing of the toolkit but `errors`, so family files
import it without reaching back into the package that registers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PARTS = ("vision_tower", "connector", "language_model", "lm_head", "backbone")
# backbone: the model without its LM head (called for hidden states)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family claims
    model_class: str  # transformers class names
    processor_class: str
    paths: dict[str, str]  # part name (PARTS) -> dotted module path from the top model
    # (config[, image processor]) -> image tokens per image (per tile); the image processor, where
    # the size it makes sets the count (a LLaVA tower that interpolates its positions: DINOv2)
    num_image_tokens: Callable[..., int]
    # (model, pixel inputs) -> (..., D_text): every image token's feature, in prompt order
    image_features: Callable[[Any, dict], Any]
    # (config dict, tokenizer, seed) -> a random LoadedModel around the tokenizer; edgevlm init
    build: Callable[[dict, Any, int], Any]
    # (processor, image tokens per image, PIL image or None) -> the text one <image> becomes
    expand_image: Callable[[Any, int, Any], str]
    # (processor, [PIL image or None per sample]) -> the model's pixel inputs ({} for none)
    pixel_inputs: Callable[[Any, list], dict]
    check_config: Callable[[dict, str], None]  # (config dict, where) -> UserError if unusable
    image_token_key: str  # the config field holding the image token id
    legacy_keys: tuple[tuple[str, str], ...] = ()  # old checkpoint key prefixes -> current
    expansion_needs_image: bool = False  # one <image>'s tokens depend on the image
    # how images reach the tower: "fixed" (one resized image, a fixed token count), "tiles"
    # (Idefics3: a grid of tiles plus the global image), "patches" (Qwen2-VL: the image at its
    # own resolution as a run of patches, with its grid)
    image_layout: str = "fixed"
    positions: str = "1d"  # "1d", or "mrope": three position streams (Qwen2-VL)
    # (processor, input_ids tensor) -> what the model needs beside the ids ({} for most)
    text_inputs: Callable[[Any, Any], dict] | None = None
    # model folder -> its processor, where AutoProcessor cannot build it (None: AutoProcessor)
    load_processor: Callable[[str], Any] | None = None
    # processor -> the most tokens one image can become, where that depends on the processor
    max_image_tokens: Callable[[Any], int] | None = None
    # model -> the torch module the exporter traces for the vision encoder, where the family
    # has its own (None: the exporter's LLaVA or tiled encoder)
    vision_graph: Callable[[Any], Any] | None = None
    # config -> "full" or "windowed" (Qwen2.5-VL's window attention): the patch graph's inputs
    patch_kind: Callable[[Any], str] | None = None
    # (model, input_ids, pixel inputs, processor) -> (position_ids (3, B, S), delta (B, 1)):
    # an M-RoPE family's positions, as the model lays them out
    rope_index: Callable[[Any, Any, dict, Any], Any] | None = None
    # whether the model class takes a mixture-of-experts text config (LLaVA-MoD's student):
    # LLaVA and Idefics3 build any text model; Qwen2-VL's decoder is its own class
    moe_text: bool = True
    # a pretrained LM's text config (llama / qwen2) -> this family's decoder config, where the
    # family has its own decoder class (init --text-from); None: the LM's config as it is
    text_config_from: Callable[[dict], dict] | None = None
    # (processor, min_pixels, max_pixels): a patch family's resize bounds (export --min-pixels)
    set_pixel_bounds: Callable[[Any, int | None, int | None], None] | None = None

    @property
    def tiled(self) -> bool:
        return self.image_layout == "tiles"

    def graph_options(self, config) -> dict:
        """How this family's graphs differ from LLaVA's (runtime.contract.graph_io's keywords):
        tiled vision IO, patch vision IO ("full" / "windowed"), M-RoPE positions."""
        return {"tiled": self.tiled,
                "patches": self.patch_kind(config) if self.patch_kind else None,
                "mrope": self.positions == "mrope"}

    def path(self, part_name: str) -> str:
        if part_name not in self.paths:
            raise KeyError(f"family {self.name} has no part {part_name!r}; parts: {PARTS}")
        return self.paths[part_name]

    def prefix(self, part_name: str) -> str:
        """The part's path with a trailing dot: the prefix of its parameter names."""
        return self.path(part_name) + "."

    def owns(self, module_name: str, part_name: str) -> bool:
        """Whether a dotted module or parameter name lies inside the part."""
        path = self.path(part_name)
        return module_name == path or module_name.startswith(path + ".")


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # the family's model class (LlavaForConditionalGeneration, ...)
    processor: Any  # and its processor (LlavaProcessor, Idefics3Processor)
    image_token_id: int
    num_image_tokens: int
