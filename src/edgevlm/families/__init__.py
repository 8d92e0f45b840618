"""Model families: what differs between LLaVA, Idefics3/SmolVLM and (later) Qwen2-VL, in one
place (DESIGN.md, "Model families").

A family is one small file exposing a `Family`: its Hugging Face classes, where the vision tower,
connector, language model and LM head live (dotted module paths from the top model), how image
features are made, how many tokens one `<image>` becomes, and the processor class. Code outside
this package asks `family_of(model_or_config)` and `part(model, "language_model")`, and never names
a module path itself.

The runtime stays torch-free and does not import this package: what it needs of a family
(image recipe, token expansion) is written into `edgevlm.json` by the exporter.
"""

from __future__ import annotations

import operator

from edgevlm.errors import UserError
from edgevlm.families import idefics3, llava, qwen2_vl
from edgevlm.families.base import PARTS, Family, LoadedModel  # noqa: F401  (re-exported)


def _registry() -> dict[str, Family]:
    return {t: f for f in (llava.FAMILY, idefics3.FAMILY, idefics3.SMOLVLM,
                                 qwen2_vl.FAMILY, qwen2_vl.QWEN2_5_VL)
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
    names = [c.__name__ for c in type(processor).__mro__]  # a family's own subclass counts
    name = names[0]
    families = {f.name: f for f in _registry().values()}.values()
    for family in families:
        if family.processor_class in names:
            return family
    raise UserError(f"processor {name} belongs to no family edgevlm knows; supported: "
                    f"{', '.join(f.processor_class for f in families)}")


def part(model, part_name: str):
    """The model's vision tower, connector, language model or LM head, wherever its family
    keeps it."""
    return operator.attrgetter(family_of(model).path(part_name))(model)
