"""`edgevlm init`: presets, any LlavaConfig, tokenizer reuse, and bad configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.models import create, load_model, num_image_tokens

CLIP_LLAMA = {
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 3,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_position_embeddings": 256},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def test_presets_are_small_and_share_vision(shapes_dir, tmp_path):
    t = create(tmp_path / "t", preset="tiny-teacher",
               tokenizer_data=[shapes_dir / "train.json"])
    s = create(tmp_path / "s", preset="tiny-student", tokenizer_from=tmp_path / "t")
    nt = sum(p.numel() for p in t.model.parameters())
    ns = sum(p.numel() for p in s.model.parameters())
    assert 1e6 < nt < 10e6 and ns < nt / 3
    tok = "tokenizer.json"
    assert (tmp_path / "t" / tok).read_text() == (tmp_path / "s" / tok).read_text()
    assert t.model.config.vision_config.to_dict() == s.model.config.vision_config.to_dict()
    loaded = load_model(tmp_path / "s")
    assert loaded.num_image_tokens == 9 and loaded.image_token_id == t.image_token_id
    assert loaded.model.config.text_config.vocab_size == len(loaded.processor.tokenizer)


def test_vision_from_copies_the_teachers_tower_only(shapes_dir, tmp_path):
    create(tmp_path / "t", preset="tiny-teacher", tokenizer_data=[shapes_dir / "train.json"])
    plain = create(tmp_path / "p", preset="tiny-student", tokenizer_from=tmp_path / "t", seed=3)
    s = create(tmp_path / "s", preset="tiny-student", tokenizer_from=tmp_path / "t", seed=3,
               vision_from=tmp_path / "t")
    teacher = load_model(tmp_path / "t").model.model.vision_tower.state_dict()
    saved = load_model(tmp_path / "s").model
    for name, w in saved.model.vision_tower.state_dict().items():
        assert torch.equal(w, teacher[name]), name
    # everything else is the plain random init of the same seed
    assert torch.equal(saved.model.multi_modal_projector.linear_1.weight,
                       plain.model.model.multi_modal_projector.linear_1.weight)
    assert not torch.equal(s.model.model.vision_tower.embeddings.patch_embedding.weight,
                           plain.model.model.vision_tower.embeddings.patch_embedding.weight)


def test_vision_from_a_different_tower_is_refused(shapes_dir, tmp_path):
    cfg = tmp_path / "clip.json"
    cfg.write_text(json.dumps(CLIP_LLAMA))
    create(tmp_path / "c", config_path=cfg, tokenizer_data=[shapes_dir / "train.json"])
    with pytest.raises(UserError, match="vision_config.model_type"):
        create(tmp_path / "s", preset="tiny-student", tokenizer_from=tmp_path / "c",
               vision_from=tmp_path / "c")
    assert not (tmp_path / "s").exists()


def test_clip_llama_config_and_processor_agree(shapes_dir, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CLIP_LLAMA))
    lm = create(tmp_path / "m", config_path=cfg, tokenizer_data=[shapes_dir / "train.json"])
    assert num_image_tokens(lm.model.config) == 16  # 4x4 patches, CLS dropped
    from PIL import Image

    loaded = load_model(tmp_path / "m")
    enc = loaded.processor(images=Image.new("RGB", (40, 30)), text="<image>\nhi",
                           return_tensors="pt")
    assert (enc["input_ids"] == loaded.image_token_id).sum() == 16
    assert enc["pixel_values"].shape[-2:] == (32, 32)
    out = loaded.model(**enc)  # the model accepts what the processor made
    assert out.logits.shape[1] == enc["input_ids"].shape[1]


@pytest.mark.parametrize("patch, message", [
    ({"text_config": {"hidden_size": 62}}, "not divisible by num_attention_heads"),
    ({"text_config": {"num_key_value_heads": 3}}, "not divisible by num_key_value_heads"),
    ({"vision_config": {"patch_size": 7}}, "not divisible by patch_size"),
    ({"text_config": {"model_type": "gpt2"}}, "text_config.model_type 'gpt2' is not supported"),
    ({"vision_feature_select_strategy": "cls"}, "must be 'default'"),
])
def test_bad_config_is_named(shapes_dir, tmp_path, patch, message):
    cfg = copy.deepcopy(CLIP_LLAMA)
    for k, v in patch.items():
        cfg[k].update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message):
        create(tmp_path / "m", config_path=path, tokenizer_data=[shapes_dir / "train.json"])
    assert not (tmp_path / "m").exists()


def test_not_a_llava_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not a model family edgevlm knows; supported: llava, "
                                        "idefics3"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "missing")


def test_init_refuses_existing_out(shapes_dir, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        create(tmp_path / "m", preset="tiny-student", tokenizer_data=[shapes_dir / "train.json"])
    assert (tmp_path / "m/keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="unknown preset"):
        create(tmp_path / "n", preset="huge", tokenizer_data=[shapes_dir / "train.json"])
