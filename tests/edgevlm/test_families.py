"""The family adapter (edgevlm.families): LLaVA behind it, found from a model, a config or a
model_type, its parts where the model keeps them, and a clear error for an unknown type."""

from __future__ import annotations

import pytest

from edgevlm.errors import UserError
from edgevlm.families import family_of, part, supported_model_types


def test_llava_parts_are_the_models_modules(micro_model_dir):
    from edgevlm.models import load_model, num_image_tokens

    model = load_model(micro_model_dir).model
    family = family_of(model)
    assert family.name == "llava" and family_of(model.config) is family
    assert family_of({"model_type": "llava"}) is family and family_of("llava") is family
    assert part(model, "language_model") is model.model.language_model
    assert part(model, "vision_tower") is model.model.vision_tower
    assert part(model, "connector") is model.model.multi_modal_projector
    assert part(model, "lm_head") is model.lm_head and part(model, "backbone") is model.model
    names = dict(model.named_modules())
    assert all(family.path(p) in names for p in ("language_model", "vision_tower", "connector"))
    assert family.owns("model.vision_tower.encoder.layers.0.mlp.fc1", "vision_tower")
    assert not family.owns("model.vision_tower_x.w", "vision_tower")
    assert num_image_tokens(model.config) == 9  # 48 px / 16 px patches, SigLIP: no CLS


def test_image_features_are_one_row_per_image_token(micro_model_dir):
    import torch

    from edgevlm.models import load_model

    loaded = load_model(micro_model_dir)
    pixels = torch.zeros(2, 3, 48, 48)
    feats = family_of(loaded.model).image_features(loaded.model, {"pixel_values": pixels})
    assert tuple(feats.shape) == (2, loaded.num_image_tokens,
                                  loaded.model.config.text_config.hidden_size)


def test_an_unknown_model_type_names_the_supported_ones(tmp_path):
    from edgevlm.models import read_config

    assert "llava" in supported_model_types()
    with pytest.raises(UserError, match=r"model_type 'mllama' belongs to no family edgevlm "
                                        r"knows; supported: llava, idefics3, smolvlm, qwen2_vl, "
                                        r"qwen2_5_vl"):
        family_of({"model_type": "mllama"})
    (tmp_path / "config.json").write_text('{"model_type": "blip-2"}')
    with pytest.raises(UserError, match="'blip-2' is not a model family edgevlm knows; "
                                        "supported: llava, idefics3"):
        read_config(tmp_path)
