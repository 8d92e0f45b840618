"""Runtime fixtures: micro LLaVA models, exported once to fp32 by edgevlm.export.

The weights are random but drawn wider than the default (initializer_range 0.1), so greedy
answers differ from image to image and run the full token budget: token-for-token parity with
transformers is then a real test, not a comparison of immediate end-of-sequence tokens.
"""

from __future__ import annotations

import pytest

_TEXT = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "max_position_embeddings": 256, "initializer_range": 0.1}

CONFIGS = {
    # SigLIP tower, every patch kept: the tiny presets' layout.
    "siglip": {"vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "image_size": 48, "patch_size": 16},
               "text_config": _TEXT, "vision_feature_layer": -1,
               "vision_feature_select_strategy": "full"},
    # CLIP tower at 32 px (so the 48 px shapes images are resized and centre-cropped), CLS
    # dropped, an earlier layer selected: the llava-1.5 layout.
    "clip": {"vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                               "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
             "text_config": _TEXT, "vision_feature_layer": -2,
             "vision_feature_select_strategy": "default"},
}


def _model_and_export(tmp_path_factory, tokenizer, name: str):
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import init_model, save_model

    root = tmp_path_factory.mktemp(f"runtime_{name}")
    save_model(init_model(CONFIGS[name], tokenizer, seed=0), root / "model")
    # Parity against torch is asserted by the runtime tests themselves, token for token.
    export(root / "model", root / "export", ExportConfig(precision="fp32", validate=False))
    return root / "model", root / "export"


@pytest.fixture(scope="session")
def siglip_pair(tmp_path_factory, tokenizer):
    return _model_and_export(tmp_path_factory, tokenizer, "siglip")


@pytest.fixture(scope="session")
def model_dir(siglip_pair):
    return siglip_pair[0]


@pytest.fixture(scope="session")
def export_dir(siglip_pair):
    return siglip_pair[1]


@pytest.fixture(scope="session")
def clip_pair(tmp_path_factory, tokenizer):
    return _model_and_export(tmp_path_factory, tokenizer, "clip")


@pytest.fixture(scope="session")
def vlm(export_dir):
    from edgevlm.runtime import VLM

    return VLM.load(export_dir, provider="cpu", threads=1)


@pytest.fixture(scope="session")
def eval_samples(shapes_dir):
    from edgevlm.data import load_samples

    return load_samples(shapes_dir / "eval.json")[:8]
