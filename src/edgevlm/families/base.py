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
    num_image_tokens: Callable[[Any], int]  # config -> image tokens per image (per tile)
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
    expansion_needs_image: bool = False  # one <image>'s tokens depend on the image (tiling)

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
