"""Model families: what differs between LLaVA, Idefics3/SmolVLM and (later) Qwen2-VL, in one
place (DESIGN.md, "Model families").

A family is one small file exposing a `Family`: its Hugging Face classes, where the vision tower,
connector, language model and LM head live (dotted module paths from the top model), how image
features are made, how many tokens one `<image>` becomes, the kind of position ids, and the
image recipe's processor class. Code outside this package asks `family_of(model_or_config)` and
`part(model, "language_model")`, and never names a module path itself.

The runtime stays torch-free and does not import this package: what it needs of a family
(image recipe, token expansion, position kind) is written into `edgevlm.json` by the exporter.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgevlm.errors import UserError

PARTS = ("vision_tower", "connector", "language_model", "lm_head", "backbone")
# backbone: the model without its LM head (called for hidden states)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this family claims
    model_class: str  # transformers class names
    config_class: str
    processor_class: str
    image_processor_class: str | None  # None: the one the vision config implies
    paths: dict[str, str]  # part name (PARTS) -> dotted module path from the top model
    position_ids: str  # "1d" | "mrope"
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


def _registry() -> dict[str, Family]:
    from edgevlm.families import idefics3, llava

    return {t: f for f in (llava.FAMILY, idefics3.FAMILY, idefics3.SMOLVLM)
            for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_registry())


def family_of(obj) -> Family:
    """The family of a model, a config object, a config dict or a model_type string."""
    if isinstance(obj, str):
        model_type = obj
    elif isinstance(obj, dict):
        model_type = obj.get("model_type")
    else:
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
    family = _registry().get(model_type)
    if family is None:
        raise UserError(f"model_type {model_type!r} belongs to no family edgevlm knows; "
                        f"supported: {', '.join(supported_model_types())}")
    return family


def family_of_processor(processor) -> Family:
    """The family whose processor class this is (LlavaProcessor, Idefics3Processor, ...)."""
    name = type(processor).__name__
    families = {f.name: f for f in _registry().values()}.values()
    for family in families:
        if family.processor_class == name:
            return family
    raise UserError(f"processor {name} belongs to no family edgevlm knows; supported: "
                    f"{', '.join(f.processor_class for f in families)}")


def part(model, part_name: str):
    """The model's vision tower, connector, language model or LM head, wherever its family
    keeps it."""
    return operator.attrgetter(family_of(model).path(part_name))(model)
