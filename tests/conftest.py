"""Shared fixtures: a small shapes data set and tiny models built here, on CPU, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Small enough that a train step takes milliseconds; shapes as the presets so every code path
# (GQA, SigLIP, feature selection) is exercised.
MICRO_CONFIG = {
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": 48, "patch_size": 16},
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "max_position_embeddings": 256},
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
}

# SmolLM2-135M's shape problem in small: a Llama text model 96 wide (as 576 = 4.5 x 128), so a
# group or block of 64 leaves a ragged last group of 32 columns in every layer reading it.
RAGGED_CONFIG = {
    **MICRO_CONFIG,
    "text_config": {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "max_position_embeddings": 256},
}


# MICRO_CONFIG with a wider, deeper decoder: the same vision tower shape (so the same 9 image
# tokens), a distillation teacher for the micro student.
TEACHER_CONFIG = {
    **MICRO_CONFIG,
    "text_config": {"model_type": "qwen2", "hidden_size": 96, "intermediate_size": 192,
                    "num_hidden_layers": 3, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "max_position_embeddings": 256},
}


@pytest.fixture
def teacher_config():
    """A fresh copy of TEACHER_CONFIG, for a test to vary."""
    import copy

    return copy.deepcopy(TEACHER_CONFIG)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from edgevlm.data import shapes

    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, n_train=64, n_eval=16, seed=1)
    return out


@pytest.fixture(scope="session")
def tokenizer(shapes_dir):
    from edgevlm.data import load_samples
    from edgevlm.models.tokenizer import train_tokenizer

    texts = [t for name in ("train.json", "pretrain.json")
             for s in load_samples(shapes_dir / name) for turn in s.turns for t in turn]
    return train_tokenizer(texts, 400)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, tokenizer):
    from edgevlm.models import init_model, save_model

    out = tmp_path_factory.mktemp("micro") / "model"
    save_model(init_model(MICRO_CONFIG, tokenizer, seed=0), out)
    return out


@pytest.fixture(scope="session")
def ragged_model_dir(tmp_path_factory, tokenizer):
    from edgevlm.models import init_model, save_model

    out = tmp_path_factory.mktemp("ragged") / "model"
    save_model(init_model(RAGGED_CONFIG, tokenizer, seed=0), out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer, shapes_dir):
    """A micro teacher, trained a little so its answers are not uniform noise."""
    from edgevlm import train
    from edgevlm.data import load_samples
    from edgevlm.models import init_model

    out = tmp_path_factory.mktemp("teacher") / "model"
    cfg = train.TrainConfig(stage="sft", steps=20, batch_size=8, lr=3e-3, warmup=2,
                            save_every=1000)
    train.run(init_model(TEACHER_CONFIG, tokenizer, seed=1),
              load_samples(shapes_dir / "train.json"), out, cfg, quiet=True)
    return out
