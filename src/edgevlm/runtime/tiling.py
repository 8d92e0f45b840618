"""Idefics3 / SmolVLM image splitting in numpy + PIL, equal to transformers'
`Idefics3ImageProcessorPil` for one image (the runtime answers one image at a time):

  convert to RGB (transparency onto white)
  -> resize so the longest edge is `size.longest_edge` (aspect kept, the other edge rounded up
     to even; LANCZOS), never past 4096
  -> with splitting: resize each edge up to a multiple of the tile (`max_image_size`), cut it
     into rows x cols tiles of tile x tile, and add the global image (the same picture resized
     to tile x tile); without: the image resized to tile x tile, rows = cols = 0
  -> rescale -> normalize, tile by tile

Every tile of one image is full (tile x tile), so the pixel attention mask is all ones. The
prompt text one `<image>` becomes for (rows, cols) is `image_prompt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime.limits import check_image_edge
from edgevlm.runtime.preprocess import SOURCE, load_image, rescale_normalize, setting, to_rgb

LANCZOS = 1
MAX_IMAGE_SIZE = 4096  # transformers' upper bound on any resized edge
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
# Tiles per image edge at most: SmolVLM and Idefics3 cut 4 x 4 (longest_edge four tiles); a
# longest_edge of 4096 over tiles of 1 px would cut 16 million tiles before any prompt check.
MAX_TILES_PER_EDGE = 16


@dataclass(frozen=True)
class TilingConfig:
    longest_edge: int  # size.longest_edge: the image's longest edge after the first resize
    tile: int  # max_image_size.longest_edge: the encoder's input size
    splitting: bool = True
    resample: int = LANCZOS
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        check_image_edge(self.longest_edge, "size.longest_edge", SOURCE)
        check_image_edge(self.tile, "max_image_size.longest_edge", SOURCE)
        per_edge = math.ceil(self.longest_edge / self.tile)
        if self.splitting and self.do_resize and per_edge > MAX_TILES_PER_EDGE:
            raise UserError(f"image processor size.longest_edge {self.longest_edge} over tiles "
                            f"of {self.tile} px cuts {per_edge} x {per_edge} tiles, more than "
                            f"the {MAX_TILES_PER_EDGE} x {MAX_TILES_PER_EDGE} this runtime "
                            f"allows; fix it in {SOURCE}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise UserError(f"image_mean {self.image_mean} / image_std {self.image_std} must hold "
                            "three values each (RGB) and std must not be 0")
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise UserError(f"image processor resample={self.resample} is not a PIL filter id "
                            f"(0 nearest .. 5 hamming; Lanczos is 1); fix it in {SOURCE}")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TilingConfig:
        """From an Idefics3 preprocessor_config.json dict."""
        size, tile = d.get("size"), d.get("max_image_size")
        if not (isinstance(size, dict) and isinstance(tile, dict) and "longest_edge" in size
                and "longest_edge" in tile):
            raise UserError("an Idefics3 image processor needs size.longest_edge and "
                            f"max_image_size.longest_edge; fix {SOURCE}")
        return cls(longest_edge=size["longest_edge"], tile=tile["longest_edge"],
                   splitting=setting(d, "do_image_splitting", "bool", True),
                   resample=setting(d, "resample", "int", LANCZOS),
                   do_resize=setting(d, "do_resize", "bool", True),
                   do_rescale=setting(d, "do_rescale", "bool", True),
                   do_normalize=setting(d, "do_normalize", "bool", True),
                   rescale_factor=setting(d, "rescale_factor", "float", 1 / 255),
                   image_mean=setting(d, "image_mean", "rgb", (0.5,) * 3),
                   image_std=setting(d, "image_std", "rgb", (0.5,) * 3))


def longest_edge_size(height: int, width: int, max_len: int) -> tuple[int, int]:
    """(height, width) with the longest edge at max_len, the other scaled and rounded up to
    even, then both kept at or below MAX_IMAGE_SIZE (transformers' two steps)."""
    ratio = width / height
    if width >= height:
        width, height = max_len, int(max_len / ratio)
        height += height % 2
    else:
        height, width = max_len, int(max_len * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ratio)
    return max(height, 1), max(width, 1)


def encoder_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Each edge rounded up to a multiple of the tile, the other following the aspect ratio."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return height, width


def _resize(hwc: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(hwc).resize((width, height), resample=resample))


def tiles(image, cfg: TilingConfig) -> tuple[np.ndarray, int, int]:
    """(pixel_values (N_tiles, 3, tile, tile) float32, rows, cols) for one image; N_tiles is
    rows·cols + 1 with splitting (the global image last), 1 without (rows = cols = 0)."""
    hwc = to_rgb(load_image(image))
    if cfg.do_resize:
        hwc = _resize(hwc, *longest_edge_size(*hwc.shape[:2], cfg.longest_edge), cfg.resample)
    rows = cols = 0
    if cfg.splitting:
        hwc = _resize(hwc, *encoder_multiple_size(*hwc.shape[:2], cfg.tile), cfg.resample)
        h, w = hwc.shape[:2]
        frames = [hwc]
        if h > cfg.tile or w > cfg.tile:
            rows, cols = (h - cfg.tile) // cfg.tile + 1, (w - cfg.tile) // cfg.tile + 1
            frames = [hwc[r * cfg.tile:(r + 1) * cfg.tile, c * cfg.tile:(c + 1) * cfg.tile]
                      for r in range(rows) for c in range(cols)]
            frames.append(_resize(hwc, cfg.tile, cfg.tile, cfg.resample))
    else:
        frames = [_resize(hwc, cfg.tile, cfg.tile, cfg.resample)]
    return np.stack([rescale_normalize(np.moveaxis(f, -1, 0), cfg) for f in frames]), rows, cols


def tiled_pixels(image: Image.Image, cfg: TilingConfig, dtype
                 ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int] | None]:
    """(1, N_tiles, 3, tile, tile) pixel values in `dtype`, the (rows, cols) grid, and the
    (W, H) the image was resized from (None: it was a tile's size already)."""
    pixels, rows, cols = tiles(image, cfg)
    pixels = pixels[None].astype(dtype)  # (1, N_tiles, 3, S, S)
    resized = (image.width, image.height) if (image.height, image.width) != pixels.shape[-2:] \
        else None
    return pixels, (rows, cols), resized


def full_mask(pixels: np.ndarray) -> np.ndarray:
    """pixel_attention_mask (B, N_tiles, H, W) of ones for pixel_values (B, N_tiles, 3, H, W):
    every tile of one image is full."""
    return np.ones((*pixels.shape[:2], *pixels.shape[-2:]), dtype=bool)


def image_prompt(rows: int, cols: int, tokens_per_tile: int, image_token: str = "<image>") -> str:
    """The text one `<image>` becomes (Idefics3Processor.replace_image_token)."""
    run = image_token * tokens_per_tile
    glob = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{run}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return glob
    grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols))
                   + "\n" for r in range(rows))
    return grid + "\n" + glob
