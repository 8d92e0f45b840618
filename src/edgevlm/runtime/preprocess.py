"""Image preprocessing in numpy + PIL, equal to the Hugging Face image processors' pixel_values.

Follows transformers' PIL backend (`SiglipImageProcessorPil`, `CLIPImageProcessorPil`,
`BitImageProcessorPil` for DINOv2) step by step, with the same dtypes at each step, so the
runtime feeds the vision encoder the very numbers the torch model saw in training and in the
parity tests:
  convert to RGB (transparency composited onto white)
  -> resize with PIL (to height x width, or the shortest edge to `shortest_edge`)
  -> centre crop (zero padding when the image is smaller than the crop)
  -> rescale (float64 multiply, then float32) -> normalize ((x - mean) / std in float32)
The settings come from the export's manifest or its preprocessor_config.json, read by
`ImageProcessorConfig.from_hf`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgevlm.errors import UserError
from edgevlm.runtime.limits import check_image_edge, shown

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)
BICUBIC = 3

# Where a user fixes a setting: the export's image processor settings come from either.
SOURCE = "edgevlm.json's image_processor or preprocessor_config.json"
_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false",
          "rgb": "three finite numbers (R, G, B) or one for all three"}


def check_normalization(cfg) -> None:
    """An image recipe's mean / std (three values, no zero std) and PIL resample filter."""
    if len(cfg.image_mean) != 3 or len(cfg.image_std) != 3 or 0 in cfg.image_std:
        raise UserError(f"image_mean {cfg.image_mean} / image_std {cfg.image_std} must hold "
                        "three values each (RGB) and std must not be 0")
    if cfg.resample not in (0, 1, 2, 3, 4, 5):
        raise UserError(f"image processor resample={shown(cfg.resample)} is not a PIL filter id "
                        "(0 nearest .. 5 hamming; bicubic is 3)")


def setting(d: dict[str, Any], key: str, kind: str, default):
    """`d[key]` (`default` when absent or null) as `kind`, one of _KINDS; any other type is a
    UserError naming the field, never a traceback from int() or float() further on."""
    value = d.get(key)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and number and isinstance(value, int):
        return value
    if kind == "float" and number and math.isfinite(value):
        return float(value)
    if kind == "bool" and (isinstance(value, bool) or value in (0, 1)):
        return bool(value)
    if kind == "rgb":
        if number:
            value = [value] * 3
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in value):
            return tuple(float(x) for x in value)
    raise UserError(f"image processor {key}={shown(value)} must be {_KINDS[kind]}; fix it in "
                    f"{SOURCE}")


# What each HF processor does when its config leaves a field out (the class defaults).
_DEFAULTS = {
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "do_center_crop": False,
                             "image_mean": STANDARD_MEAN, "image_std": STANDARD_STD},
    "CLIPImageProcessor": {"size": {"shortest_edge": 224}, "do_center_crop": True,
                           "crop_size": {"height": 224, "width": 224},
                           "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
}
# DINOv2's (BitImageProcessor): CLIP's steps and class defaults; facebook/dinov2-* set a 256
# shortest edge, a 224 crop and ImageNet statistics in their preprocessor_config.json
_DEFAULTS["BitImageProcessor"] = _DEFAULTS["CLIPImageProcessor"]


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image processor settings the runtime needs (names as in preprocessor_config.json).

    Exactly one of (`height`, `width`) or `shortest_edge` sets the resize target.
    """

    height: int | None = 224
    width: int | None = 224
    shortest_edge: int | None = None
    crop_height: int | None = None  # set together with crop_width when centre cropping
    crop_width: int | None = None
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = STANDARD_MEAN
    image_std: tuple[float, ...] = STANDARD_STD

    def __post_init__(self):
        if self.do_resize and (self.shortest_edge is None) == (self.height is None):
            raise UserError("image processor size: give either height and width or shortest_edge "
                            "(found both or neither); fix `size` in preprocessor_config.json")
        for name in ("height", "width", "shortest_edge", "crop_height", "crop_width"):
            value = getattr(self, name)
            if value is not None:  # 1 to 4096 px, before PIL is asked to resize to it
                check_image_edge(value, name, SOURCE)
        if (self.height is None) != (self.width is None):
            raise UserError("image processor size needs both height and width")
        if (self.crop_height is None) != (self.crop_width is None):
            raise UserError("image processor crop_size needs both height and width")
        check_normalization(self)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None when it follows the image's."""
        if self.crop_height is not None:
            return self.crop_height, self.crop_width
        if self.do_resize and self.height is not None:
            return self.height, self.width
        return None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """From a preprocessor_config.json dict (or the `image_processor` part of
        processor_config.json), filling absent fields with that processor class's defaults."""
        kind = d.get("image_processor_type") or "SiglipImageProcessor"
        kind = kind.removesuffix("Pil").removesuffix("Fast") if isinstance(kind, str) else kind
        if not isinstance(kind, str) or kind not in _DEFAULTS:
            raise UserError(f"image_processor_type {shown(kind)} is not supported by the "
                            f"runtime; supported: {', '.join(_DEFAULTS)}")
        d = {**_DEFAULTS[kind], **{k: v for k, v in d.items() if v is not None}}
        size = d["size"]
        if isinstance(size, int):  # old configs: an int means the shortest edge
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or not ({"height", "width"} <= set(size)
                                              or set(size) == {"shortest_edge"}):
            raise UserError(f"image processor size {shown(size)} is not supported by the "
                            "runtime; use {'height': H, 'width': W} or {'shortest_edge': S}")
        crop = d.get("crop_size") if setting(d, "do_center_crop", "bool", False) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if crop is not None and not (isinstance(crop, dict) and {"height", "width"} <= set(crop)):
            raise UserError(f"image processor crop_size {shown(crop)} must be "
                            "{'height', 'width'}")
        return cls(height=size.get("height"), width=size.get("width"),
                   shortest_edge=size.get("shortest_edge"),
                   crop_height=crop["height"] if crop else None,
                   crop_width=crop["width"] if crop else None,
                   do_resize=setting(d, "do_resize", "bool", True),
                   do_rescale=setting(d, "do_rescale", "bool", True),
                   do_normalize=setting(d, "do_normalize", "bool", True),
                   do_convert_rgb=setting(d, "do_convert_rgb", "bool", True),
                   resample=setting(d, "resample", "int", BICUBIC),
                   rescale_factor=setting(d, "rescale_factor", "float", 1 / 255),
                   image_mean=setting(d, "image_mean", "rgb", None),
                   image_std=setting(d, "image_std", "rgb", None))


def load_image(source, name: str | None = None) -> Image.Image:
    """A PIL image from a path, encoded image bytes (PNG, JPEG, ... as read from a file or a
    data URL), a PIL image or a uint8 array (H, W[, C]); UserError names it (`name`: what to
    call bytes in an error, such as the file they were read from)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), name or f"({memoryview(source).nbytes} bytes)")
    path = image_path(source)
    return _decode(path, str(path))


def image_path(source) -> Path:
    """`source` as the path of an existing file; a UserError for anything else."""
    if not isinstance(source, (str, Path)):
        raise UserError(f"image must be a file path, encoded image bytes, a PIL image or a uint8 "
                        f"array, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"image {path} does not exist; give the path of a PNG/JPEG/... file")
    return path


def _decode(file, name: str) -> Image.Image:
    try:
        with Image.open(file) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            return im.copy()
    except Image.DecompressionBombError as e:
        raise UserError(f"image {name} is too large to decode safely ({e}); downscale it "
                        "first") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {name}: not an image PIL can decode ({e}); give a "
                        "PNG, JPEG, WebP, ... file") from e


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3
                                                            and arr.shape[-1] not in (1, 3, 4)):
        raise UserError(f"image array must be uint8 with shape (H, W) or (H, W, 1|3|4), got "
                        f"{arr.dtype} {arr.shape}")
    if 0 in arr.shape[:2]:
        raise UserError(f"image array is {arr.shape[1]}x{arr.shape[0]} pixels; an image needs "
                        "at least one")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; any transparency is composited onto white, as transformers does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def resize_target(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) after resizing; the shortest-edge rule truncates like transformers."""
    if cfg.shortest_edge is None:
        return cfg.height, cfg.width
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of a (C, H, W) array, zero-padded first when it is smaller than the crop."""
    h, w = chw.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return chw[:, top: top + height, left: left + width]
    new_h, new_w = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((chw.shape[0], new_h, new_w), dtype=chw.dtype)
    padded[:, pad_top: pad_top + h, pad_left: pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top): min(new_h, top + height), max(0, left): min(new_w, left + width)]


def preprocess(image, cfg: ImageProcessorConfig) -> np.ndarray:
    """pixel_values (1, 3, H, W) float32 for one image (path, PIL image or uint8 array)."""
    pil = load_image(image)
    if cfg.do_convert_rgb:
        hwc = to_rgb(pil)
    else:
        hwc = np.asarray(pil)
        if hwc.ndim != 3 or hwc.shape[-1] != 3:
            raise UserError(f"image has mode {pil.mode} but do_convert_rgb is off; give an RGB "
                            "image or set do_convert_rgb true in preprocessor_config.json")
    if cfg.do_resize:
        h, w = resize_target(hwc.shape[0], hwc.shape[1], cfg)
        hwc = np.asarray(Image.fromarray(hwc).resize((w, h), resample=cfg.resample))
    chw = np.moveaxis(hwc, -1, 0)  # (3, H, W)
    if cfg.crop_height is not None:
        chw = center_crop(chw, cfg.crop_height, cfg.crop_width)
    return rescale_normalize(chw, cfg)[None]  # (1, 3, H, W)


def encoder_pixels(image: Image.Image, cfg: ImageProcessorConfig, dtype, fixed: tuple
                   ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(1, 3, H, W) pixel values in `dtype` for a vision encoder whose input is `fixed` (H, W;
    symbolic dims are not checked), and the (W, H) the image was resized from (None: it was
    not)."""
    pixels = preprocess(image, cfg).astype(dtype)
    if all(isinstance(d, int) for d in fixed) and pixels.shape[2:] != tuple(fixed):
        raise UserError(f"the image processor settings give {pixels.shape[2:]} pixels but "
                        f"the vision encoder takes {tuple(fixed)}; re-export")
    resized = (image.width, image.height) if (image.height, image.width) != pixels.shape[2:] \
        else None
    return pixels, resized


def rescale_normalize(chw: np.ndarray, cfg) -> np.ndarray:
    """(3, H, W) uint8 -> float32, rescaled (float64 multiply, as transformers) and normalized
    as `cfg` (any config with do_rescale, rescale_factor, do_normalize, image_mean, image_std)
    says."""
    x = chw
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32, copy=False)
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)
