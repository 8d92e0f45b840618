"""The export wrappers compute exactly what the transformers model computes (torch only)."""

from __future__ import annotations

import copy

import pytest
import torch

from edgevlm.export.graphs import Decoder, EmbedTokens, VisionEncoder, text_dims
from edgevlm.models import PRESETS, init_model


@pytest.fixture(scope="module")
def models(tokenizer, clip_llama_config):
    multi = copy.deepcopy(clip_llama_config)
    multi["vision_feature_layer"] = [-3, -1]  # a list of layers, concatenated
    return {"siglip-qwen2": init_model(PRESETS["tiny-student"], tokenizer).model,
            "clip-llama": init_model(clip_llama_config, tokenizer).model,
            "clip-llama-multi": init_model(multi, tokenizer).model}


@pytest.mark.parametrize("name", ["siglip-qwen2", "clip-llama", "clip-llama-multi"])
def test_vision_encoder_equals_get_image_features(models, name):
    model = models[name]
    vc = model.config.vision_config
    pixels = torch.randn(2, 3, vc.image_size, vc.image_size)
    with torch.no_grad():
        want = torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))
        got = VisionEncoder(model)(pixels)
    n = (vc.image_size // vc.patch_size) ** 2  # CLIP's CLS is dropped by strategy "default"
    assert got.shape == (2, n, model.config.text_config.hidden_size)
    assert torch.equal(got, want)


def test_embed_tokens(models):
    model = models["clip-llama"]
    ids = torch.tensor([[1, 5, 7], [3, 3, 9]])
    assert torch.equal(EmbedTokens(model)(ids), model.get_input_embeddings()(ids))


@pytest.mark.parametrize("name", ["siglip-qwen2", "clip-llama"])
def test_decoder_prefill_then_step_equals_full_forward(models, name):
    """An empty past then a one-token step reproduce the model's logits on the whole sequence."""
    model = models[name]
    dims = text_dims(model.config)
    ids = torch.randint(4, dims.vocab_size, (2, 7))
    embeds = model.get_input_embeddings()(ids)
    decoder = Decoder(model)
    empty = [torch.zeros(2, dims.num_kv_heads, 0, dims.head_dim)] * (2 * dims.num_layers)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        first = decoder(embeds[:, :6], torch.ones(2, 6, dtype=torch.long),
                        torch.arange(6).expand(2, 6), *empty)
        step = decoder(embeds[:, 6:], torch.ones(2, 7, dtype=torch.long),
                       torch.full((2, 1), 6), *first[1:])
    assert len(first) == 1 + 2 * dims.num_layers
    assert first[1].shape == (2, dims.num_kv_heads, 6, dims.head_dim)
    assert step[1].shape == (2, dims.num_kv_heads, 7, dims.head_dim)
    torch.testing.assert_close(first[0], want[:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0], want[:, 6:], atol=1e-5, rtol=0)
