"""Image features kept by what determines them, so a second question on one image skips the
vision encoder (issue 36, item 4).

An entry is the vision encoder's output for one image after token selection, (1, N_img, D) as
the decoder takes it, with what the prompt needs besides (an Idefics3 image's tile grid, the
size it was resized from). Its key is a SHA-256 over

  - the image: the bytes of the file (read once, and those very bytes are decoded, so a file
    rewritten between the hash and the decode cannot file new features under the old hash), the
    encoded bytes passed in, a PIL image's mode, size, palette, transparency and pixels, or a
    uint8 array's dtype, shape and data;
  - the settings that turn those into features (`settings`: the image processor or tiling
    config, the pixel dtype, the vision graph, the token selection and its count), so a change
    to any of them misses.

The cache is bounded by the bytes of the arrays it holds and evicts the least recently used
entry first (an OrderedDict under one lock: several threads share one VLM). Two threads that
miss on one image both run the encoder; their identical results land in one entry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgevlm.runtime.preprocess import image_path

MB = 2**20


@dataclass(frozen=True)
class HashedImage:
    """An image argument with its digest; `source` is what to decode (a path's bytes, read once)
    and `name` what to call it in an error."""

    digest: str
    source: Any
    name: str | None = None


@dataclass(frozen=True)
class CachedImage:
    features: np.ndarray  # (1, N_img, D), read-only, owning its data
    grid: tuple[int, int] | None = None  # Idefics3: (rows, cols) of tiles, for the prompt
    resized_from: tuple[int, int] | None = None  # (W, H), as Timings reports it

    @property
    def nbytes(self) -> int:
        return self.features.nbytes


@dataclass(frozen=True)
class LookUp:
    """One call's image against the cache: what to decode on a miss (`source`, called `name` in
    errors), the key to keep its features under (None: the cache is off or there is no image)
    and the entry found (None: a miss)."""

    source: Any
    name: str | None = None
    key: str | None = None
    hit: CachedImage | None = None


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds and how it has fared since the VLM opened."""

    max_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int


def hash_image(image) -> HashedImage:
    """The digest of what determines an image's pixels, for any image `load_image` takes."""
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"encoded\0")
        h.update(image)
        return HashedImage(h.hexdigest(), image)
    if isinstance(image, Image.Image):
        pixels = image.tobytes()  # first: it loads a lazily opened image, palette included
        palette = image.palette
        h.update(f"pil\0{image.mode}\0{image.size}\0{image.info.get('transparency')!r}\0"
                 f"{palette.mode if palette is not None else None}\0".encode())
        if palette is not None:
            h.update(palette.tobytes())
        h.update(pixels)
        return HashedImage(h.hexdigest(), image)
    if isinstance(image, np.ndarray):
        h.update(f"array\0{image.dtype.str}\0{image.shape}\0".encode())
        h.update(np.ascontiguousarray(image).data)
        return HashedImage(h.hexdigest(), image)
    path = image_path(image)  # a UserError for anything but an existing file's path
    data = Path(path).read_bytes()
    h.update(b"encoded\0")  # the same digest as the file's bytes passed in
    h.update(data)
    return HashedImage(h.hexdigest(), data, str(path))


def cache_key(digest: str, settings: str) -> str:
    """The key of one image's features under `settings` (everything else that shapes them)."""
    return hashlib.sha256(f"{digest}\0{settings}".encode()).hexdigest()


def frozen_features(features: np.ndarray) -> np.ndarray:
    """A read-only array owning its data: a view would keep its larger base alive unseen by the
    byte count, and a caller writing into an entry would change later answers."""
    out = features if features.flags.owndata and features.base is None else features.copy()
    out.setflags(write=False)
    return out


class ImageCache:
    """LRU of CachedImage by key, at most `max_bytes` of feature arrays; 0 turns it off."""

    def __init__(self, max_bytes: int):
        assert max_bytes >= 0, f"max_bytes={max_bytes} must not be negative"
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = self._hits = self._misses = self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def look_up(self, image, settings: Callable[[], str]) -> LookUp:
        """`image` (any that load_image takes, or None) against the cache; `settings` gives the
        rest of the key (called only when the cache is on and there is an image)."""
        if image is None or not self.enabled:
            return LookUp(image)
        hashed = hash_image(image)  # a path's bytes are read once: hashed, then decoded
        key = cache_key(hashed.digest, settings())
        return LookUp(hashed.source, hashed.name, key, self.get(key))

    def keep(self, key: str, features: np.ndarray, grid: tuple[int, int] | None = None,
             resized_from: tuple[int, int] | None = None) -> np.ndarray:
        """Put one image's features (1, N_img, D) under `key`; returns the read-only array kept,
        equal to `features`."""
        features = frozen_features(features)
        self.put(key, CachedImage(features, grid, resized_from))
        return features

    def put(self, key: str, entry: CachedImage) -> None:
        """Keep `entry`, evicting the least recently used until it fits; one larger than the
        whole bound is not kept."""
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = entry
            self._bytes += entry.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.max_bytes, self._bytes, len(self._entries), self._hits,
                              self._misses, self._evictions)
