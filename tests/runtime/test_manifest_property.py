"""Property test over edgevlm.json (issue 33): any field the reader takes, set to a value of any
type or size (or several at once), gives an answer or one line, never a traceback, a hang or a
runaway allocation. Derandomized, so CI sees the same examples every run."""

from __future__ import annotations

import json
import resource
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.contract import MANIFEST

# Every edgevlm.json field the reader takes ("a.b": nested), so each can be given a bad value.
FIELDS = [
    "format_version", "components", "components.decoder_model_merged",
    "components.decoder_model_merged.file", "components.vision_encoder.precision",
    "rope_file", "decoder", "decoder.kind", "decoder.max_context", "decoder.activations",
    "static_shapes", "static_shapes.context", "profile", "family", "token_select",
    "token_select.method", "vision_tokens", "num_layers", "num_kv_heads", "head_dim",
    "image_token_id", "num_image_tokens", "eos_token_id", "max_position_embeddings",
    "chat_template", "image_processor", "image_processor.size", "image_processor.size.height",
    "image_processor.size.width", "image_processor.size.shortest_edge",
    "image_processor.crop_size", "image_processor.do_center_crop", "image_processor.image_mean",
    "image_processor.image_std", "image_processor.resample", "image_processor.rescale_factor",
    "image_processor.do_resize", "image_processor.do_convert_rgb",
    "image_processor.image_processor_type", "preprocessor",
]
WORDS = ["fp16", "fp32", "builder", "traced", "mobile", "llava", "idefics3", "visionzip",
         "onnx/decoder_model_merged.onnx", "onnx/vision_encoder.onnx", "../outside",
         "/etc/passwd", "a\x00b", "line\nbreak", "{{ messages }}", "height", "shortest_edge"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 600), st.integers(-(10**40), 10**40),
    st.sampled_from([0, 1, 2, 9, 32, 48, 255, 256, 4096, 10**6, 10**9, 10**12, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["height", "width", "shortest_edge", "file",
                                               "precision", "context", "method", "kind"]),
                              st.text(max_size=6)), inner, max_size=4)), max_leaves=8)
changes = st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def work(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest_property") / "export"
    shutil.copytree(export_dir, root)
    return root, json.loads((root / MANIFEST).read_text())


def apply(manifest: dict, edits) -> dict:
    m = json.loads(json.dumps(manifest))
    for key, value in edits:
        *parents, last = key.split(".")
        node = m
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return m


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=changes)
def test_any_manifest_gives_an_answer_or_one_line(work, edits):
    root, manifest = work
    (root / MANIFEST).write_text(json.dumps(apply(manifest, edits)))
    before = rss_peak_mb()
    try:
        vlm = VLM.load(root, provider="cpu", threads=1)
        for image in (np.full((20, 30, 3), 90, np.uint8), None):
            result = vlm.generate(image, "What is it?", max_new_tokens=2, min_new_tokens=1)
            assert isinstance(result.text, str) and len(result.token_ids) <= 2
    except UserError as e:
        text = str(e)
        assert text and "\n" not in text.strip() and len(text) < 600, repr(text)
    finally:
        (root / MANIFEST).write_text(json.dumps(manifest))
    assert rss_peak_mb() - before < 500, f"{edits} grew the peak memory past 500 MB"
