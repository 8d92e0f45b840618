"""The image-feature cache (issue 36, item 4): a second question on one image skips the vision
encoder and answers bit for bit as an uncached VLM; other image bytes or other preprocessing
settings miss; the bound in bytes evicts the least recently used; threads share one cache."""

from __future__ import annotations

import dataclasses
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.image_cache import (
    CachedImage,
    ImageCache,
    cache_key,
    frozen_features,
    hash_image,
)
from edgevlm.runtime.limits import MAX_CACHE_MB, machine_memory

NEW_TOKENS = 8


class VisionCount:
    """Counts the vision session's runs: its own `run`, wrapped on the instance (the model and
    its session stay real)."""

    def __init__(self, vlm, monkeypatch):
        self.calls = 0
        self._lock = threading.Lock()
        real = vlm._vision.run

        def run(*args, **kwargs):
            with self._lock:
                self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(vlm._vision, "run", run)


@pytest.fixture
def cached(export_dir):
    return VLM.load(export_dir, provider="cpu", threads=1, image_cache_mb=1)


def _ids(vlm, image, question="<image>\nWhat color is the circle?"):
    return vlm.generate(image, question, max_new_tokens=NEW_TOKENS).token_ids


def test_second_question_skips_the_vision_encoder(cached, vlm, eval_samples, monkeypatch):
    count = VisionCount(cached, monkeypatch)
    image = eval_samples[0].image
    questions = ["<image>\nWhat color is the circle?", "<image>\nHow many shapes are there?"]
    first = cached.generate(image, questions[0], max_new_tokens=NEW_TOKENS)
    second = cached.generate(image, questions[1], max_new_tokens=NEW_TOKENS)
    assert count.calls == 1
    assert not first.timings.image_cached and second.timings.image_cached
    assert second.timings.vision_s < first.timings.vision_s
    # bit for bit what a VLM without the cache answers, for both questions
    assert first.token_ids == _ids(vlm, image, questions[0])
    assert second.token_ids == _ids(vlm, image, questions[1])
    # a repeat of the first question too, and through stream()
    stream = cached.stream(image, questions[0], max_new_tokens=NEW_TOKENS)
    assert "".join(stream).strip() == first.text and stream.result.token_ids == first.token_ids
    # the file's bytes passed in are the same image: a hit; a PIL image hashes its pixels
    assert _ids(cached, open(image, "rb").read(), questions[1]) == second.token_ids
    assert count.calls == 1
    pil = Image.open(image)
    assert _ids(cached, pil) == first.token_ids and count.calls == 2
    assert _ids(cached, Image.open(image)) == first.token_ids and count.calls == 2
    s = cached.image_cache.stats()
    assert (s.hits, s.misses, s.entries) == (4, 2, 2)
    assert s.bytes == 2 * 9 * 64 * 4  # two (1, 9, 64) float32 feature arrays
    assert vlm.image_cache.stats().entries == 0  # the default is off


def test_other_image_bytes_or_settings_miss(cached, vlm, eval_samples, monkeypatch, tmp_path):
    count = VisionCount(cached, monkeypatch)
    a, b = eval_samples[0].image, eval_samples[1].image
    _ids(cached, a)
    assert _ids(cached, b) == _ids(vlm, b) and count.calls == 2
    # the same pixels encoded into other bytes: another key (hashing stays on the bytes)
    other = tmp_path / "same_pixels.png"
    Image.open(a).save(other, compress_level=0)
    assert other.read_bytes() != open(a, "rb").read()
    _ids(cached, other)
    assert count.calls == 3
    # one pixel changed in an array: a miss
    arr = np.asarray(Image.open(a).convert("RGB")).copy()
    _ids(cached, arr)
    arr[0, 0, 0] ^= 1
    _ids(cached, arr)
    assert count.calls == 5
    # other preprocessing settings: the same file misses, and answers as an uncached VLM does
    ip = cached.info.image_processor
    cached.info = dataclasses.replace(cached.info, image_processor=dataclasses.replace(
        ip, image_mean=(0.4, 0.5, 0.6)))
    vlm_other = VLM.load(vlm.info.root, provider="cpu", threads=1)
    vlm_other.info = cached.info
    assert _ids(cached, a) == _ids(vlm_other, a)
    assert count.calls == 6
    _ids(cached, a)
    assert count.calls == 6


def test_keys_follow_the_bytes_and_the_settings(tmp_path):
    img = Image.fromarray(np.arange(48 * 48 * 3, dtype=np.uint8).reshape(48, 48, 3))
    path = tmp_path / "a.png"
    img.save(path)
    by_path, by_bytes = hash_image(path), hash_image(path.read_bytes())
    assert by_path.digest == by_bytes.digest
    assert by_path.source == path.read_bytes() and by_path.name == str(path)
    assert hash_image(img).digest != hash_image(img.convert("RGBA")).digest
    p = img.convert("P")
    recoloured = p.copy()
    recoloured.putpalette([255 - v for v in p.getpalette()])
    assert hash_image(p).digest != hash_image(recoloured).digest  # same indices, other colours
    arr = np.asarray(img)
    assert hash_image(arr).digest != hash_image(arr.reshape(48, 144, 1)).digest
    assert hash_image(arr).digest == hash_image(np.asfortranarray(arr)).digest
    assert cache_key(by_path.digest, "s1") != cache_key(by_path.digest, "s2")
    with pytest.raises(UserError, match="does not exist"):
        hash_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="image must be a file path"):
        hash_image(3.5)


def _entry(fill: float, tokens: int = 9) -> CachedImage:
    return CachedImage(frozen_features(np.full((1, tokens, 64), fill, np.float32)))


def test_the_bound_in_bytes_evicts_the_least_recently_used():
    one = _entry(0).nbytes
    assert one == 9 * 64 * 4
    cache = ImageCache(3 * one)
    for k in "abc":
        cache.put(k, _entry(ord(k)))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", _entry(4))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    s = cache.stats()
    assert (s.bytes, s.entries, s.evictions) == (3 * one, 3, 1)
    # a larger entry evicts as many as it needs; one larger than the whole bound is not kept
    cache.put("wide", _entry(5, tokens=18))
    assert cache.stats().bytes <= 3 * one and cache.get("wide") is not None
    cache.put("huge", _entry(6, tokens=30))
    assert cache.get("huge") is None and cache.stats().bytes <= 3 * one
    # a view is copied, so the count is the bytes held; entries are read-only
    base = np.zeros((1, 90, 64), np.float32)
    kept = frozen_features(base[:, :9])
    assert kept.base is None and kept.nbytes == one and not kept.flags.writeable
    # re-putting a key replaces its bytes, never counts them twice
    cache.put("a", _entry(7))
    assert cache.stats().bytes == sum(cache.get(k).nbytes for k in list(cache._entries))


def test_a_vlm_bound_evicts(export_dir, vlm, eval_samples, monkeypatch):
    small = VLM.load(export_dir, provider="cpu", threads=1, image_cache_mb=1)
    one = 9 * 64 * 4
    small.image_cache = ImageCache(2 * one)  # room for two images' features
    count = VisionCount(small, monkeypatch)
    a, b, c = (s.image for s in eval_samples[:3])
    for image in (a, b, c):  # c evicts a
        _ids(small, image)
    assert small.image_cache.stats().bytes == 2 * one
    _ids(small, b)
    assert count.calls == 3
    assert _ids(small, a) == _ids(vlm, a) and count.calls == 4
    assert small.image_cache.stats().evictions == 2


def test_bad_bounds_are_one_line(export_dir):
    for bad in (-1, 1.5, True, "64", None):
        with pytest.raises(UserError, match="image_cache_mb=.* must be a whole number") as e:
            VLM.load(export_dir, image_cache_mb=bad)
        assert "\n" not in str(e.value)
    memory = machine_memory()
    cap = min(MAX_CACHE_MB, memory // 2 // 2**20) if memory else MAX_CACHE_MB
    with pytest.raises(UserError, match=f"more than the {cap} MB this machine allows"):
        VLM.load(export_dir, image_cache_mb=cap + 1)
    with pytest.raises(UserError, match="more than the"):
        VLM.load(export_dir, image_cache_mb=10**30)
    assert VLM.load(export_dir, image_cache_mb=0).image_cache.enabled is False


def test_threads_share_one_cache(export_dir, vlm, eval_samples, monkeypatch):
    serial = {s.image: _ids(vlm, s.image) for s in eval_samples}
    shared = VLM.load(export_dir, provider="cpu", threads=1, image_cache_mb=1)
    count = VisionCount(shared, monkeypatch)
    jobs = [s.image for s in eval_samples] * 4
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda image: _ids(shared, image), jobs))
    assert got == [serial[image] for image in jobs]
    s = shared.image_cache.stats()
    assert s.hits + s.misses == len(jobs) and s.entries == len(eval_samples)
    assert s.bytes == len(eval_samples) * 9 * 64 * 4
    assert len(eval_samples) <= count.calls == s.misses  # a miss at once on one image runs twice
    # a bound of three images under the same load: answers stay exact, the bound holds
    shared.image_cache = ImageCache(3 * 9 * 64 * 4)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda image: _ids(shared, image), jobs))
    assert got == [serial[image] for image in jobs]
    s = shared.image_cache.stats()
    assert s.entries <= 3 and s.bytes <= 3 * 9 * 64 * 4 and s.evictions > 0


def test_encoded_bytes_are_an_image(vlm, cached, eval_samples, tmp_path):
    image = eval_samples[2].image
    data = open(image, "rb").read()
    assert _ids(vlm, data) == _ids(vlm, image) == _ids(vlm, io.BytesIO(data).getvalue())
    assert _ids(vlm, bytearray(data)) == _ids(cached, memoryview(data)) == _ids(vlm, image)
    for model in (vlm, cached):
        with pytest.raises(UserError, match=r"cannot read image \(10 bytes\)"):
            _ids(model, b"not a png!")
        bad = tmp_path / "answer.jpg"
        bad.write_text("not a jpeg")
        with pytest.raises(UserError, match="answer.jpg"):
            _ids(model, bad)


@pytest.fixture(scope="module")
def smolvlm_export(tmp_path_factory, tokenizer):
    import copy

    from edgevlm.export import ExportConfig, export
    from edgevlm.models import PRESETS, init_model, save_model

    root = tmp_path_factory.mktemp("image_cache_smolvlm")
    save_model(init_model(PRESETS["tiny-smolvlm"], copy.deepcopy(tokenizer), seed=0),
               root / "model")
    export(root / "model", root / "export", ExportConfig(precision="fp32", validate=False))
    return root / "export"


def test_a_tiled_image_keeps_its_tile_grid(smolvlm_export, monkeypatch):
    """Idefics3: a hit rebuilds the prompt from the cached (rows, cols), so a wide image's and a
    square one's tile grids give the uncached prompts and answers."""
    plain = VLM.load(smolvlm_export, provider="cpu", threads=1)
    cached = VLM.load(smolvlm_export, provider="cpu", threads=1, image_cache_mb=4)
    count = VisionCount(cached, monkeypatch)
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (40, 150, 3), dtype=np.uint8)
    square = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for image in (wide, square, wide, square):
        want = plain.generate(image, "What is it?", max_new_tokens=NEW_TOKENS)
        got = cached.generate(image, "What is it?", max_new_tokens=NEW_TOKENS)
        assert got.token_ids == want.token_ids
        assert got.timings.n_prompt_tokens == want.timings.n_prompt_tokens
        assert got.timings.image_resized_from == want.timings.image_resized_from
    assert count.calls == 2
    entries = [cached.image_cache.get(k) for k in list(cached.image_cache._entries)]
    # longest edge 96 over 48 px tiles: 150 x 40 -> 96 x 26 -> 96 x 48, 1 x 2; 48 x 48 -> 2 x 2
    assert {e.grid for e in entries} == {(1, 2), (2, 2)}
    assert cached.image_cache.stats().bytes == sum(e.features.nbytes for e in entries)
