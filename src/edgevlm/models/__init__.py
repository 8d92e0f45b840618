"""Models: load and save (load.py), create (`edgevlm init`, new.py), presets, the text-LM graft
(text_lm.py), mixture-of-experts upcycling (moe.py), visual token reduction (token_reduce.py) and
tokenizer training (tokenizer.py). What each family does differently lives in edgevlm.families."""

from edgevlm.families import LoadedModel
from edgevlm.models.load import (
    SUPPORTED_MODEL_TYPES,
    load_model,
    num_image_tokens,
    read_config,
    save_model,
)
from edgevlm.models.new import copy_vision_tower, create, init_model
from edgevlm.models.presets import PRESETS

__all__ = ["PRESETS", "SUPPORTED_MODEL_TYPES", "LoadedModel", "copy_vision_tower", "create",
           "init_model", "load_model", "num_image_tokens", "read_config", "save_model"]
