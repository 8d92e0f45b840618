"""Property tests of the torch-free runtime (issue 20), derandomized so CI sees the same
examples every run: random images (PIL modes, sizes down to
1x1, alpha, arrays of any dtype and shape), random Unicode prompts (lone surrogates and control
characters included) and random generation settings give a result or a UserError, never
another exception; and several threads sharing one VLM answer as one thread does, with resident
memory flat over repeated calls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm.errors import UserError

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr", "HSV"]


@pytest.fixture(scope="module")
def vlm(micro_model_dir, tmp_path_factory):
    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    out = tmp_path_factory.mktemp("prop") / "export"
    export(micro_model_dir, out, ExportConfig(precision="fp32", validate=False))
    return VLM.load(out, provider="cpu")


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["pil", "array", "none", "other"]))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    if kind == "other":
        return draw(st.sampled_from([b"\x89PNG", 3, [1, 2, 3], "/no/such/image.png", ""]))
    if kind == "pil":
        mode = draw(st.sampled_from(MODES))
        h, w = max(h, 1), max(w, 1)  # PIL cannot make a 0-pixel image
        rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        if mode == "P":
            return rgba.convert("RGB").convert("P")
        if mode == "PA":
            im = rgba.convert("RGB").convert("P")
            im.info["transparency"] = 0
            return im
        return rgba.convert(mode) if mode not in ("I;16",) else rgba.convert("L").convert(mode)
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.float32, np.int64, np.bool_]))
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    shape = (h, w) if channels is None else (h, w, channels)
    if draw(st.booleans()) and channels is not None:
        shape = (1, *shape)  # a batch axis
    return (rng.random(shape) * 255).astype(dtype)


prompts = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system",
                                                             "robot"]),
                                    "content": st.text(max_size=10)}), max_size=3),
    st.sampled_from(["", "<image>", "<image><image> twice", "\x00\x01", "caf\udce9"]),
)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(image=images(), prompt=prompts, max_new_tokens=st.integers(-2, 6),
       temperature=st.one_of(floats, st.sampled_from([0.0, 0.7])),
       top_p=st.one_of(floats, st.just(1.0)), top_k=st.integers(-2, 100),
       seed=st.one_of(st.none(), st.integers(-3, 2**33)),
       stop=st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
       min_new_tokens=st.integers(-1, 8))
def test_any_input_gives_a_result_or_a_user_error(vlm, image, prompt, max_new_tokens,
                                                  temperature, top_p, top_k, seed, stop,
                                                  min_new_tokens):
    try:
        result = vlm.generate(image, prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              stop=stop, min_new_tokens=min_new_tokens)
    except UserError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)
        return
    assert isinstance(result.text, str)
    assert 0 <= len(result.token_ids) <= max_new_tokens


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(image=images(), prompt=st.text(st.characters(codec="utf-8"), max_size=40),
       max_new_tokens=st.integers(1, 4), temperature=st.sampled_from([0.0, 0.7, 1.5]),
       seed=st.integers(0, 2**32 - 1))
def test_any_valid_image_with_a_valid_prompt_is_answered(vlm, image, prompt, max_new_tokens,
                                                       temperature, seed):
    """Valid settings: a PIL image of any mode and size, or a uint8 (H, W[, 1|3|4]) array, and
    any text without the image tag are answered; other images get a UserError."""
    valid = (image is None or isinstance(image, Image.Image)
             or (isinstance(image, np.ndarray) and image.dtype == np.uint8
                 and image.ndim in (2, 3) and 0 not in image.shape[:2]
                 and (image.ndim == 2 or image.shape[-1] in (1, 3, 4))))
    if "<image>" in prompt or not valid:
        with pytest.raises(UserError):
            vlm.generate(image, prompt, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
        return
    result = vlm.generate(image, prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed)
    assert 1 <= len(result.token_ids) + (result.finish_reason != "length") <= max_new_tokens + 1
    assert result.finish_reason in ("eos", "stop", "length")


def test_threads_sharing_one_vlm_answer_as_one_thread(vlm):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    jobs = [(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8), f"Question {i}?")
            for i in range(16)]
    serial = [vlm.generate(im, q, max_new_tokens=4).token_ids for im, q in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda j: vlm.generate(*j, max_new_tokens=4).token_ids, jobs * 3))
    assert threaded == serial * 3


def test_resident_memory_stays_flat_over_repeated_calls(vlm):
    import gc
    import resource

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    image = np.full((32, 32, 3), 128, np.uint8)
    for _ in range(20):  # warm up allocator pools and onnxruntime's arenas
        vlm.generate(image, "What is it?", max_new_tokens=4)
    gc.collect()
    before = rss_mb()
    for _ in range(150):
        vlm.generate(image, "What is it?", max_new_tokens=4)
    gc.collect()
    grown = rss_mb() - before
    assert grown < 8.0, f"resident memory grew {grown:.1f} MB over 150 calls"
