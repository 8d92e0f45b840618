"""Export fixtures: tiny random LLaVA models (parity needs no training) and their exports."""

from __future__ import annotations

import pytest

# CLIP vision + Llama text, LLaVA-1.5 style: penultimate layer, CLS dropped. Widths are
# multiples of 32 so int4 blocks of 32 fit.
CLIP_LLAMA_CONFIG = {
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64,
                      "intermediate_size": 128, "num_hidden_layers": 3,
                      "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                      "projection_dim": 64},
    "text_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 256, "tie_word_embeddings": False},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
}


def _save(config: dict, tokenizer, out):
    from edgevlm.models import init_model, save_model

    loaded = init_model(config, tokenizer, seed=0)
    save_model(loaded, out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    from edgevlm.models import PRESETS

    return _save(PRESETS["tiny-teacher"], tokenizer, tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="session")
def clip_llama_config() -> dict:
    return CLIP_LLAMA_CONFIG


@pytest.fixture(scope="session")
def clip_llama_dir(tmp_path_factory, tokenizer):
    return _save(CLIP_LLAMA_CONFIG, tokenizer, tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="session")
def teacher_fp32(tmp_path_factory, teacher_dir):
    from edgevlm.export import ExportConfig, export

    return export(teacher_dir, tmp_path_factory.mktemp("fp32") / "out", ExportConfig())


@pytest.fixture(scope="session")
def teacher_fp32_traced(tmp_path_factory, teacher_dir):
    """The traced decoder (torch.onnx over transformers' modules), the builder's reference."""
    from edgevlm.export import ExportConfig, export

    return export(teacher_dir, tmp_path_factory.mktemp("fp32_traced") / "out",
                  ExportConfig(decoder="traced"))
