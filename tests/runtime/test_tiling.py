"""The runtime's Idefics3 / SmolVLM image splitting (numpy + PIL) equals transformers'
Idefics3ImageProcessorPil bit for bit, and its prompt equals Idefics3Processor's, for square,
wide, tall, tiny and large images, with splitting on and off and up to 4 x 4 tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.tiling import TilingConfig, image_prompt, tiles

SIZES = {"square": (64, 64), "wide": (150, 40), "tall": (30, 100), "tiny": (3, 2),
         "one pixel": (1, 1), "large": (500, 333), "just over a tile": (49, 48)}


@pytest.fixture(scope="module")
def processor(tokenizer):
    import copy

    from edgevlm.families.idefics3 import build
    from edgevlm.models import PRESETS

    cfg = copy.deepcopy(PRESETS["tiny-smolvlm"])
    cfg.pop("model_type")
    return build(cfg, copy.deepcopy(tokenizer), 0).processor


@pytest.mark.parametrize("tiles_per_side", [2, 4])
@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("name", list(SIZES))
def test_tiles_and_prompt_equal_the_hf_processor(processor, name, splitting, tiles_per_side):
    ip = processor.image_processor
    ip.do_image_splitting = splitting
    ip.size = {"longest_edge": 48 * tiles_per_side}
    rng = np.random.default_rng(sum(map(ord, name)))
    w, h = SIZES[name]
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    hf = ip([[image]], return_tensors="np", return_row_col_info=True)
    cfg = TilingConfig.from_hf(ip.to_dict())
    ours, rows, cols = tiles(image, cfg)
    assert (rows, cols) == (hf["rows"][0][0], hf["cols"][0][0])
    assert ours.shape == hf["pixel_values"][0].shape
    assert np.abs(ours - hf["pixel_values"][0]).max() <= 1e-5
    assert hf["pixel_attention_mask"].min() == 1  # one image: every tile is full
    assert image_prompt(rows, cols, 9) == processor.replace_image_token(hf, 0)
    if splitting and name == "large":
        # 500 x 333 -> longest edge 96 x 64 -> 96 x 96: 2 x 2; 192 x 128 -> 192 x 144: 3 x 4
        assert (rows, cols) == {2: (2, 2), 4: (3, 4)}[tiles_per_side]


def test_a_config_without_the_tile_size_is_named():
    from edgevlm.errors import UserError

    with pytest.raises(UserError, match="needs size.longest_edge and max_image_size"):
        TilingConfig.from_hf({"size": {"longest_edge": 96}})
