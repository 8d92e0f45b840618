"""The model presets `edgevlm init --preset` starts from: config dicts of each family
(model_type picks it; LLaVA when absent). Tiny ones make the test suite's models; the SmolLM2
ones are shaped for `--text-from` the real LM (docs/data-and-training.md, "A real pretrained
LM")."""

from __future__ import annotations

from typing import Any

_TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 96,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 48,
    "patch_size": 16,
    "num_channels": 3,
}

# The real SmolLM2-135M's text config (what `--text-from` the GGUF gives), and the small
# 224-px tower both SmolLM2 presets put under it, as a SigLIP or as an Idefics3 tower.
_SMOLLM2_TEXT = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
_SMALL_224_TOWER = {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
                    "num_attention_heads": 3, "image_size": 224, "patch_size": 16,
                    "num_channels": 3}

_TINY_QWEN_VISION = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2,
                     "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                     "temporal_patch_size": 2}
_TINY_QWEN_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 1024, "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [4, 6, 6]}}

PRESETS: dict[str, dict[str, Any]] = {
    # SmolVLM in small (issue 17): Idefics3 with a SigLIP-style tower of 8-px patches at 48 px
    # (36 patches), pixel shuffle by 2 (9 tokens per tile), images split 2 x 2 plus the global
    # image as SmolVLM's processor does, and a Llama decoder.
    "tiny-smolvlm": {
        "model_type": "idefics3",
        "vision_config": {"model_type": "idefics3_vision", "hidden_size": 96,
                          "intermediate_size": 192, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 48, "patch_size": 8,
                          "num_channels": 3},
        "text_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 512,
                        "rope_theta": 10000.0, "tie_word_embeddings": False},
        "scale_factor": 2,
        "do_image_splitting": True,
        "max_tiles_per_side": 2,
    },
    # SigLIP-style vision tower + Qwen2-style decoder, a few million parameters.
    "tiny-teacher": {
        "vision_config": _TINY_VISION,
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
    },
    # Same vision tower and tokenizer, a much smaller decoder: half the width, one layer, so that
    # trained alone it stays well below the teacher (widths stay multiples of 128 so the usual
    # int4 group sizes 32/64/128 divide every layer).
    "tiny-student": {
        "vision_config": _TINY_VISION,
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
    },
    # SmolLM2-135M (SmolVLM-256M's decoder) under a small SigLIP-style tower at 224 px: 196
    # image tokens, as a LLaVA of that resolution sees. Meant for `--text-from` the real LM
    # (python -m benchmarks.smollm2 locate); alone it is a random model of the same shape.
    "llava-smollm2": {
        "vision_config": {"model_type": "siglip_vision_model", **_SMALL_224_TOWER},
        "text_config": _SMOLLM2_TEXT,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
    },
    # SmolVLM-256M's shape in small: the real SmolLM2 (`--text-from`) under llava-smollm2's
    # tower as an Idefics3 tower (224 px, 16-px patches), pixel shuffle by 2 (49 tokens per
    # tile; SmolVLM: 512 px, shuffle 4, 64), images split 2 x 2 plus the global image.
    "smolvlm-smollm2": {
        "model_type": "idefics3",
        "vision_config": {"model_type": "idefics3_vision", **_SMALL_224_TOWER},
        "text_config": _SMOLLM2_TEXT,
        "scale_factor": 2,
        "do_image_splitting": True,
        "max_tiles_per_side": 2,
    },
    # Qwen2-VL in small: a 14-px-patch tower of 2 layers, 2 x 2 merge, a 2-layer Qwen2 decoder
    # with M-RoPE; images resized to 4..25 merged tokens (112x112 .. 140x140 px and aspect
    # ratios between), so tests see several grids.
    "tiny-qwen2vl": {
        "model_type": "qwen2_vl",
        "vision_config": _TINY_QWEN_VISION,
        "text_config": {**_TINY_QWEN_TEXT, "model_type": "qwen2_vl_text"},
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 25,
    },
    "tiny-qwen2.5vl": {
        "model_type": "qwen2_5_vl",
        "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128,
                          "num_heads": 2, "out_hidden_size": 128, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 56, "fullatt_block_indexes": [1]},
        "text_config": {**_TINY_QWEN_TEXT, "model_type": "qwen2_5_vl_text"},
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 25,
    },
    # Qwen2-VL's shape around the real SmolLM2 (`--text-from`; its Llama layers become Qwen2-VL's
    # decoder with zero q/k/v biases and M-RoPE sections 8:12:12): a 4-layer tower of 14-px
    # patches, 2 x 2 merge; images resized to 196..1024 merged tokens (a small image grows to
    # 392 x 392 px, 196 tokens: the LLaVA row's count at 224 px; 896 x 896 at most).
    "qwen2vl-smollm2": {
        "model_type": "qwen2_vl",
        "vision_config": {"depth": 4, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "text_config": {**{k: v for k, v in _SMOLLM2_TEXT.items() if k != "rope_theta"},
                        "model_type": "qwen2_vl_text",
                        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0,
                                            "mrope_section": [8, 12, 12]}},
        "min_pixels": 28 * 28 * 196,
        "max_pixels": 28 * 28 * 1024,
    },
}
