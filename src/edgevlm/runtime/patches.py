"""Qwen2-VL / Qwen2.5-VL dynamic-resolution image patches in numpy + PIL, bit-equal to
transformers' `Qwen2VLImageProcessorPil` (both families share it).

The image keeps its aspect ratio: `smart_resize` picks the nearest height and width that are
multiples of patch_size * merge_size with a pixel count inside [min_pixels, max_pixels], then
  convert to RGB (transparency onto white, `preprocess.to_rgb`) -> resize with PIL
  -> rescale (float64 multiply, then float32) -> normalize (float32), `preprocess.rescale_normalize`
  -> cut into patch_size x patch_size patches, ordered merge block by merge block, each repeated
     temporal_patch_size times (a still image is a clip of identical frames)
giving pixel_values (N_patches, C * T * P * P) float32 and a grid (t, h, w) in patches. The prompt
holds t * h * w / merge_size^2 `<|image_pad|>` tokens per image (`expand_image_pad`), as
`Qwen2VLProcessor` writes them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime.limits import MAX_IMAGE_EDGE, shown
from edgevlm.runtime.preprocess import (
    BICUBIC,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SOURCE,
    check_normalization,
    load_image,
    rescale_normalize,
    setting,
    to_rgb,
)

IMAGE_PAD = "<|image_pad|>"
# transformers' class defaults (`size` = {shortest_edge: min, longest_edge: max}).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
# The most pixels an image may be resized to: the square of the longest edge the runtime resizes
# to (limits.MAX_IMAGE_EDGE). Qwen2-VL's own largest setting, 12845056 = 3584^2, fits.
PIXEL_BOUND = MAX_IMAGE_EDGE**2
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer/shorter edge ratios above this
# Frames per temporal patch: Qwen uses 2; a still image is copied this many times, so the
# bound keeps a crafted config from multiplying the pixel values' memory.
MAX_TEMPORAL_PATCH = 16
_PROCESSOR = "Qwen2VLImageProcessor"


@dataclass(frozen=True)
class PatchConfig:
    """The Qwen2-VL image processor settings (names as in preprocessor_config.json; min_pixels
    and max_pixels are its size.shortest_edge and size.longest_edge)."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels"):
            _check_int(name, getattr(self, name), PIXEL_BOUND)
        if self.min_pixels > self.max_pixels:
            raise UserError(f"image processor min_pixels={self.min_pixels} is more than "
                            f"max_pixels={self.max_pixels}; give min_pixels <= max_pixels")
        _check_int("patch_size", self.patch_size, MAX_IMAGE_EDGE)
        _check_int("merge_size", self.merge_size, MAX_IMAGE_EDGE)
        _check_int("temporal_patch_size", self.temporal_patch_size, MAX_TEMPORAL_PATCH)
        if self.factor > MAX_IMAGE_EDGE:
            raise UserError(f"image processor patch_size * merge_size = {self.factor} is over "
                            f"the {MAX_IMAGE_EDGE} px edge the runtime resizes to; fix it in "
                            f"{SOURCE}")
        check_normalization(self)

    @property
    def factor(self) -> int:
        """Both resized edges are multiples of this: one merged block of patches, in pixels."""
        return self.patch_size * self.merge_size

    def replace(self, **changes) -> PatchConfig:
        """A copy with `changes` (such as min_pixels / max_pixels from the command line),
        validated like any PatchConfig."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"PatchConfig has no setting {', '.join(unknown)}; settings: "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> PatchConfig:
        """From a preprocessor_config.json dict, read as `Qwen2VLImageProcessorPil` reads it:
        size {shortest_edge, longest_edge} (class default when absent), overridden by top-level
        min_pixels / max_pixels where given (older configs write only those)."""
        kind = d.get("image_processor_type")
        if kind is not None and not (isinstance(kind, str) and kind.startswith(_PROCESSOR)):
            raise UserError(f"image_processor_type {shown(kind)} is not {_PROCESSOR}; this "
                            "config is not a Qwen2-VL image processor's")
        min_pixels, max_pixels = _pixel_range(d)
        return cls(min_pixels=min_pixels, max_pixels=max_pixels,
                   patch_size=setting(d, "patch_size", "int", 14),
                   temporal_patch_size=setting(d, "temporal_patch_size", "int", 2),
                   merge_size=setting(d, "merge_size", "int", 2),
                   do_resize=setting(d, "do_resize", "bool", True),
                   do_rescale=setting(d, "do_rescale", "bool", True),
                   do_normalize=setting(d, "do_normalize", "bool", True),
                   do_convert_rgb=setting(d, "do_convert_rgb", "bool", True),
                   resample=setting(d, "resample", "int", BICUBIC),
                   rescale_factor=setting(d, "rescale_factor", "float", 1 / 255),
                   image_mean=setting(d, "image_mean", "rgb", OPENAI_CLIP_MEAN),
                   image_std=setting(d, "image_std", "rgb", OPENAI_CLIP_STD))


def _check_int(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise UserError(f"image processor {name}={shown(value)} must be an integer from 1 to "
                        f"{high}; fix it in {SOURCE}")


def _pixel_range(d: dict[str, Any]) -> tuple[int, int]:
    """(min_pixels, max_pixels) as `Qwen2VLImageProcessorPil.__init__` resolves them."""
    size = d.get("size")
    if size is None:
        size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    if not isinstance(size, dict):
        raise UserError(f"image processor size={shown(size)} must be {{'shortest_edge': "
                        f"min_pixels, 'longest_edge': max_pixels}}; fix it in {SOURCE}")
    low = setting(d, "min_pixels", "int", None)
    high = setting(d, "max_pixels", "int", None)
    low = setting(size, "shortest_edge", "int", None) if low is None else low
    high = setting(size, "longest_edge", "int", None) if high is None else high
    if not low or not high:  # transformers refuses a missing or zero bound too
        raise UserError(f"image processor size={shown(size)} needs shortest_edge (min pixels) "
                        f"and longest_edge (max pixels), or give top-level min_pixels and "
                        f"max_pixels; fix it in {SOURCE}")
    return low, high


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled (keeping the aspect ratio as
    closely as it can) so the pixel count lies within [min_pixels, max_pixels]: transformers'
    `qwen2_vl.image_processing_pil_qwen2_vl.smart_resize`, line for line. Tiny images are scaled
    up; an aspect ratio over 200 is refused, as there."""
    if min(height, width) < 1:
        raise UserError(f"image is {width}x{height} pixels; an image needs at least one")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(f"image is {width}x{height} pixels, an aspect ratio of "
                        f"{max(height, width) / min(height, width):.0f}:1; Qwen2-VL takes at most "
                        f"{MAX_ASPECT_RATIO}:1, so crop or pad the image first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Patches(NamedTuple):
    """One image as the Qwen2-VL vision tower takes it."""

    pixel_values: np.ndarray  # (t * h * w, C * T * P * P) float32, merge blocks contiguous
    grid: tuple[int, int, int]  # (t, h, w) in patches: image_grid_thw


def patchify(image, cfg: PatchConfig) -> Patches:
    """pixel_values and grid for one image (path, bytes, PIL image or uint8 array), bit-equal
    to `Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")`."""
    pil = load_image(image)
    hwc = _rgb(pil, cfg)
    height, width = hwc.shape[:2]
    if cfg.do_resize:
        height, width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        if height * width > PIXEL_BOUND:  # only crafted settings overshoot max_pixels this far
            raise UserError(f"image {pil.width}x{pil.height} would be resized to {width}x{height}"
                            f", over the {PIXEL_BOUND} pixels the runtime allows; lower "
                            "max_pixels or crop the image")
        hwc = np.asarray(Image.fromarray(hwc).resize((width, height), resample=cfg.resample))
    elif height % cfg.factor or width % cfg.factor:
        raise UserError(f"image is {width}x{height} pixels but do_resize is off, so both edges "
                        f"must be multiples of patch_size * merge_size = {cfg.factor}; resize it "
                        "or set do_resize true")
    chw = rescale_normalize(np.moveaxis(hwc, -1, 0), cfg)  # (C, H, W) float32
    return Patches(_flatten(chw, cfg), (1, height // cfg.patch_size, width // cfg.patch_size))


def _rgb(pil: Image.Image, cfg: PatchConfig) -> np.ndarray:
    """(H, W, 3) uint8, converted as transformers converts (or refused when it would not be)."""
    if cfg.do_convert_rgb:
        return to_rgb(pil)
    hwc = np.asarray(pil)
    if hwc.ndim != 3 or hwc.shape[-1] != 3:
        raise UserError(f"image has mode {pil.mode} but do_convert_rgb is off; give an RGB "
                        "image or set do_convert_rgb true in preprocessor_config.json")
    return hwc


def _flatten(chw: np.ndarray, cfg: PatchConfig) -> np.ndarray:
    """(C, H, W) -> (H/P * W/P, C * T * P * P): `Qwen2VLImageProcessorPil.patchify`."""
    c, height, width = chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # (gh/m, gw/m, m, m, C, T, P, P): each frame repeated T times, as a zero-copy view
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def image_tokens(grid: Sequence[int], merge_size: int) -> int:
    """How many `<|image_pad|>` tokens stand for an image of `grid` (t, h, w) patches:
    t * h * w // merge_size^2, as `Qwen2VLProcessor.replace_image_token` counts them."""
    if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer))
                             or g < 1 for g in grid):
        raise UserError(f"image grid {shown(tuple(grid))} must be three positive integers "
                        "(t, h, w)")
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size < 1:
        raise UserError(f"merge_size={shown(merge_size)} must be a positive integer")
    t, h, w = (int(g) for g in grid)
    return t * h * w // merge_size**2


def expand_image_pad(text: str, count: int | Sequence[int], pad_token: str = IMAGE_PAD) -> str:
    """`text` with its i-th `pad_token` repeated count[i] times (an int: one image), as
    `Qwen2VLProcessor` expands the prompt before tokenizing it."""
    if not isinstance(pad_token, str) or not pad_token:
        raise UserError(f"pad_token {shown(pad_token)} must be a non-empty string")
    counts = [count] if isinstance(count, (int, np.integer)) else list(count)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
           for c in counts):
        raise UserError(f"image token counts {shown(counts)} must be positive integers")
    parts = text.split(pad_token)
    if len(parts) - 1 != len(counts):
        raise UserError(f"the prompt holds {len(parts) - 1} {pad_token} placeholders but "
                        f"{len(counts)} images were given; put one {pad_token} per image")
    out = [parts[0]]
    for n, part in zip(counts, parts[1:]):
        out += [pad_token * int(n), part]
    return "".join(out)
