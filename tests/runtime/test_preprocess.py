"""Runtime image preprocessing equals the Hugging Face PIL image processors' pixel_values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime.preprocess import ImageProcessorConfig, load_image, preprocess

SIZES = [(48, 48), (17, 93), (1, 1), (301, 41), (3, 500), (1280, 960)]  # (width, height)


def _images(width: int, height: int, seed: int = 0):
    rng = np.random.default_rng(seed + width * 7 + height)
    a = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    palette = Image.fromarray(a[..., :3]).convert("P")
    palette.info["transparency"] = 0  # a GIF-style transparent colour: composited onto white
    return {"RGB": Image.fromarray(a[..., :3]), "RGBA": Image.fromarray(a, "RGBA"),
            "L": Image.fromarray(a[..., 0]), "LA": Image.fromarray(a[..., :2], "LA"),
            "P": palette, "array": a[..., :3], "array_rgba": a}


def _processors():
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

    return {
        "siglip": SiglipImageProcessorPil(size={"height": 48, "width": 48}),
        "siglip_rect_bilinear": SiglipImageProcessorPil(size={"height": 37, "width": 53},
                                                        resample=2),
        "clip": CLIPImageProcessorPil(size={"shortest_edge": 36},
                                      crop_size={"height": 36, "width": 36}),
        # Crop larger than the resized image on one side: exercises the zero padding.
        "clip_pad": CLIPImageProcessorPil(size={"shortest_edge": 30},
                                          crop_size={"height": 40, "width": 33}),
        # DINOv2's (facebook/dinov2-small: 256, crop 224) in small, ImageNet statistics
        "bit_dinov2": BitImageProcessorPil(size={"shortest_edge": 40},
                                           crop_size={"height": 35, "width": 35},
                                           image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225]),
    }


@pytest.mark.parametrize("name", ["siglip", "siglip_rect_bilinear", "clip", "clip_pad",
                                  "bit_dinov2"])
def test_matches_hf_processor(name):
    hf = _processors()[name]
    cfg = ImageProcessorConfig.from_hf(hf.to_dict())
    for width, height in SIZES:
        for mode, image in _images(width, height).items():
            if mode.startswith("array") and min(width, height) <= 4:
                continue  # transformers guesses the channel axis of tiny arrays (and errs)
            ref = hf(images=[image], return_tensors="np")["pixel_values"]
            out = preprocess(image, cfg)
            assert out.shape == ref.shape and out.dtype == np.float32, (mode, width, height)
            np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0,
                                       err_msg=f"{name} {mode} {width}x{height}")


def test_reads_saved_model_config(micro_model_dir, shapes_dir):
    import json

    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(micro_model_dir)
    cfg = ImageProcessorConfig.from_hf(
        json.loads((micro_model_dir / "preprocessor_config.json").read_text()))
    image = next((shapes_dir / "images").glob("*.png"))
    ref = hf(images=[Image.open(image)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(preprocess(image, cfg), ref, atol=1e-5, rtol=0)


def test_clip_defaults_fill_missing_fields():
    cfg = ImageProcessorConfig.from_hf({"image_processor_type": "CLIPImageProcessor",
                                        "size": 224})
    assert (cfg.shortest_edge, cfg.crop_height, cfg.crop_width) == (224, 224, 224)
    assert cfg.image_mean[0] == pytest.approx(0.48145466)


def test_not_an_image_names_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    with pytest.raises(UserError, match="notes.png"):
        load_image(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="cut.png"):
        load_image(path)


def test_bad_settings_name_the_field():
    with pytest.raises(UserError, match="image_processor_type"):
        ImageProcessorConfig.from_hf({"image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(UserError, match="size"):
        ImageProcessorConfig.from_hf({"image_processor_type": "SiglipImageProcessor",
                                      "size": {"longest_edge": 10}})
