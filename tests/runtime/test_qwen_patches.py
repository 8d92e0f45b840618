"""Qwen2-VL image patches equal transformers' Qwen2VLImageProcessorPil bit for bit, and the
prompt's image placeholders expand as Qwen2VLProcessor expands them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime.patches import (
    PatchConfig,
    expand_image_pad,
    image_tokens,
    patchify,
    smart_resize,
)

SIZES = {"square": (300, 300), "wide": (640, 200), "tall": (180, 700), "tiny": (20, 30),
         "large": (1500, 1100), "odd": (333, 97)}  # (width, height)


def _noise(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def _images() -> dict[str, Image.Image]:
    out = {name: Image.fromarray(_noise(w, h, 3, i)) for i, (name, (w, h)) in
           enumerate(SIZES.items())}
    out["rgba"] = Image.fromarray(_noise(150, 90, 4, 10), "RGBA")
    out["gray"] = Image.fromarray(_noise(90, 150, 1, 11)[..., 0], "L")
    return out


IMAGES = _images()


def _hf(**kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(**kwargs)


def _saved(hf, tmp_path) -> dict:
    """The preprocessor_config.json transformers writes for `hf`: what an export carries."""
    hf.save_pretrained(tmp_path)
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


def _assert_equal(hf, cfg: PatchConfig, images=IMAGES) -> None:
    for name, image in images.items():
        ref = hf(images=[image], return_tensors="np")
        out = patchify(image, cfg)
        assert out.pixel_values.dtype == np.float32, name
        assert np.array_equal(out.pixel_values, ref["pixel_values"]), name
        assert out.grid == tuple(ref["image_grid_thw"][0].tolist()), name


@pytest.mark.parametrize("kwargs", [
    {},  # the class defaults: 3136 to 1003520 pixels
    {"min_pixels": 64 * 28 * 28, "max_pixels": 160 * 28 * 28},  # scales most images
    # Qwen3-VL-like geometry and statistics, bilinear: no constant is assumed
    {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
     "image_std": [0.5] * 3, "resample": 2, "max_pixels": 300 * 32 * 32},
])
def test_patches_equal_transformers(kwargs, tmp_path):
    hf = _hf(**kwargs)
    cfg = PatchConfig.from_hf(_saved(hf, tmp_path))
    _assert_equal(hf, cfg)


def test_replace_overrides_pixels_as_transformers_kwargs_do(tmp_path):
    cfg = PatchConfig.from_hf(_saved(_hf(), tmp_path)).replace(min_pixels=40_000,
                                                             max_pixels=90_000)
    _assert_equal(_hf(min_pixels=40_000, max_pixels=90_000), cfg)


def test_reads_top_level_min_max_pixels_as_older_configs_write_them(tmp_path):
    """Hub Qwen2-VL / Qwen2.5-VL configs give min_pixels / max_pixels beside (and over) size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    d = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 50_000,
         "max_pixels": 120_000, "size": {"shortest_edge": 3136, "longest_edge": 12845056},
         "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(d))
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    cfg = PatchConfig.from_hf(d)
    assert (cfg.min_pixels, cfg.max_pixels) == (50_000, 120_000)
    _assert_equal(hf, cfg, {k: IMAGES[k] for k in ("tiny", "wide", "large")})


def test_no_rescale_or_normalize_still_matches(tmp_path):
    hf = _hf(do_rescale=False, do_normalize=False)
    _assert_equal(hf, PatchConfig.from_hf(_saved(hf, tmp_path)),
                  {k: IMAGES[k] for k in ("odd", "rgba")})


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 200), (28, 28), (20, 30), (55, 57), (3000, 4000)]
    sizes += [tuple(int(x) for x in rng.integers(1, 5000, 2)) for _ in range(400)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for factor, low, high in [(28, 3136, 1003520), (32, 100, 40_000), (28, 3136, 12845056)]:
            assert smart_resize(h, w, factor, low, high) == hf_smart_resize(h, w, factor, low,
                                                                             high), (h, w)
    assert smart_resize(20, 30) == (56, 84)  # tiny images are scaled up to min_pixels


def _tokenizer():
    """A character-level tokenizer built here, with Qwen's vision special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": [
        "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]})
    return fast


def _processor(tokenizer, image_processor):
    """Qwen2VLProcessor around the two. Its __init__ insists on a video processor, which needs
    torchvision (not installed here), so the attributes its __init__ sets are set directly; the
    processor's own __call__ then runs unchanged."""
    from transformers.models.qwen2_vl import Qwen2VLProcessor

    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.chat_template, proc.video_processor = None, None
    proc.image_processor, proc.tokenizer = image_processor, tokenizer
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


@pytest.mark.parametrize("names", [["wide"], ["tiny", "tall"], ["square", "rgba", "odd"]])
def test_expansion_equals_qwen2vl_processor(names):
    tok = _tokenizer()
    hf = _hf(max_pixels=200 * 28 * 28)
    proc = _processor(tok, hf)
    cfg = PatchConfig(max_pixels=200 * 28 * 28)
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    text = "look " + " and ".join(slot for _ in names) + " what is it"
    ref = proc(text=[text], images=[IMAGES[n] for n in names], return_tensors="np")
    grids = [patchify(IMAGES[n], cfg).grid for n in names]
    assert grids == [tuple(g) for g in ref["image_grid_thw"].tolist()]
    counts = [image_tokens(g, cfg.merge_size) for g in grids]
    ids = tok(expand_image_pad(text, counts))["input_ids"]
    assert ids == ref["input_ids"][0].tolist()
    assert sum(counts) == int(ref["mm_token_type_ids"].sum())


def test_image_tokens_and_single_count():
    assert image_tokens((1, 4, 4), 2) == 4 and image_tokens((1, 6, 10), 2) == 15
    assert expand_image_pad("a<|image_pad|>b", 3) == "a" + "<|image_pad|>" * 3 + "b"
    assert expand_image_pad("no image", []) == "no image"


@pytest.mark.parametrize("field, value", [
    ("patch_size", "14"), ("merge_size", 2.0), ("temporal_patch_size", True),
    ("image_mean", [0.5, 0.5]), ("rescale_factor", "1/255"), ("do_resize", "yes"),
    ("resample", 9), ("min_pixels", -1), ("max_pixels", 10**9), ("temporal_patch_size", 64),
    ("size", [3136, 1003520]), ("image_processor_type", "CLIPImageProcessor"),
])
def test_bad_config_fields_name_the_field(field, value):
    with pytest.raises(UserError, match=field.split("_")[-1]):
        PatchConfig.from_hf({field: value})


def test_size_without_bounds_is_refused():
    with pytest.raises(UserError, match="shortest_edge"):
        PatchConfig.from_hf({"size": {"shortest_edge": 3136}})
    with pytest.raises(UserError, match="shortest_edge"):  # transformers refuses this too
        PatchConfig.from_hf({"size": {"min_pixels": 3136, "max_pixels": 9000}})


def test_min_above_max_pixels_is_refused():
    with pytest.raises(UserError, match="min_pixels=5000 is more than max_pixels=4000"):
        PatchConfig().replace(min_pixels=5000, max_pixels=4000)
    with pytest.raises(UserError, match="min_pixels"):
        PatchConfig.from_hf({"min_pixels": 9000, "max_pixels": 4000})
    with pytest.raises(UserError, match="no setting max_pixel"):
        PatchConfig().replace(max_pixel=4000)


def test_extreme_aspect_ratio_is_refused_like_transformers():
    image = Image.fromarray(_noise(2010, 10, 3, 0))
    with pytest.raises(ValueError, match="aspect ratio"):
        _hf()(images=[image], return_tensors="np")
    with pytest.raises(UserError, match="aspect ratio of 201:1"):
        patchify(image, PatchConfig())
    _assert_equal(_hf(), PatchConfig(), {"200:1": Image.fromarray(_noise(2000, 10, 3, 0))})


def test_unresized_image_must_fit_the_patch_grid():
    cfg = PatchConfig(do_resize=False)
    assert patchify(Image.fromarray(_noise(56, 84, 3, 0)), cfg).grid == (1, 6, 4)
    with pytest.raises(UserError, match="multiples of patch_size"):
        patchify(Image.fromarray(_noise(50, 84, 3, 0)), cfg)
    with pytest.raises(UserError, match="do_convert_rgb"):
        patchify(IMAGES["gray"], PatchConfig(do_convert_rgb=False))
