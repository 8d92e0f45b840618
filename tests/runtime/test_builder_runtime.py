"""Builder and traced decoders through the same VLM: equal answers, older exports still load, and
a prompt over the KV buffer names the option that sets it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.contract import MANIFEST

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def traced_dir(tmp_path_factory, model_dir):
    from edgevlm.export import ExportConfig, export

    out = tmp_path_factory.mktemp("traced") / "export"
    export(model_dir, out, ExportConfig(decoder="traced", validate=False))
    return out


def _answers(vlm, samples) -> list[tuple[int, ...]]:
    return [vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS).token_ids
            for s in samples]


def test_traced_and_built_decoders_answer_alike(vlm, traced_dir, eval_samples):
    traced = VLM.load(traced_dir, provider="cpu", threads=1)
    assert vlm.info.decoder == "builder" and traced.info.decoder == "traced"
    want = _answers(traced, eval_samples)
    assert len({a for a in want}) > 1 and all(len(a) == NEW_TOKENS for a in want)
    assert _answers(vlm, eval_samples) == want


def test_an_export_from_before_the_builder_still_loads(traced_dir, tmp_path, eval_samples):
    """Format 2 had no "decoder" key: such a manifest reads as a traced decoder."""
    old = tmp_path / "old"
    shutil.copytree(traced_dir, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest.pop("decoder")
    manifest["format_version"] = 2
    (old / MANIFEST).write_text(json.dumps(manifest))
    vlm = VLM.load(old, provider="cpu")
    assert vlm.info.decoder == "traced" and vlm.info.context is None
    assert _answers(vlm, eval_samples[:2]) == _answers(VLM.load(traced_dir), eval_samples[:2])


def test_prompt_over_the_kv_buffer_names_max_context(tmp_path, model_dir, eval_samples):
    from edgevlm.export import ExportConfig, export

    export(model_dir, tmp_path / "small", ExportConfig(max_context=40, validate=False))
    vlm = VLM.load(tmp_path / "small", provider="cpu")
    assert vlm.info.context == vlm.info.max_tokens == 40
    s = eval_samples[0]
    out = vlm.generate(s.image, s.question, max_new_tokens=64)  # the answer fills the buffer
    assert out.timings.n_prompt_tokens + len(out.token_ids) <= 40
    with pytest.raises(UserError, match=r"the prompt is \d+ tokens \(with the image's 9\) but "
                                        r"the export's KV buffer holds 40 positions "
                                        r"\(decoder.max_context\); shorten the prompt or "
                                        r"re-export with a larger --max-context"):
        vlm.generate(s.image, "circle " * 40)


def test_bad_decoder_entries(export_dir, tmp_path):
    for entry, message in (({"kind": "fused"}, "decoder.kind 'fused' is unknown"),
                           ({"kind": "builder"}, "needs decoder.max_context")):
        bad = tmp_path / entry["kind"]
        shutil.copytree(export_dir, bad)
        manifest = json.loads((bad / MANIFEST).read_text())
        manifest["decoder"] = entry
        (bad / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=message):
            VLM.load(bad)


def test_traced_backend_hands_on_growing_presents(vlm, traced_dir, eval_samples):
    """The traced decoder behind the Decoder interface: its cache starts empty and each pass
    returns new presents one entry longer per token fed, which carry the prompt exactly as a
    builder decoder's KV buffers do; a prompt over max_position_embeddings names that limit."""
    from edgevlm.runtime.decoders import TracedDecoder

    traced = VLM.load(traced_dir, provider="cpu", threads=1)
    assert type(traced._backend) is TracedDecoder
    past = traced._new_cache()
    assert len(past) == 2 * traced.info.num_layers and {p.shape()[2] for p in past} == {0}
    ids = np.asarray([1, 2, 3, 4], np.int64)
    _, past3 = traced._decode(traced._embed_ids(ids[:3]), 0, past)
    assert {p.shape()[2] for p in past3} == {3} and {p.shape()[2] for p in past} == {0}
    logits, past4 = traced._decode(traced._embed_ids(ids[3:]), 3, past3)
    assert {p.shape()[2] for p in past4} == {4} and logits.dtype == np.float32
    whole, _ = traced._decode(traced._embed_ids(ids), 0, traced._new_cache())
    built, _ = vlm._decode(vlm._embed_ids(ids), 0, vlm._new_cache())
    assert np.abs(logits - whole).max() <= 1e-5 * np.abs(whole).max()
    assert np.abs(built - whole).max() <= 1e-4 * np.abs(whole).max()
    limit = traced.info.max_position_embeddings
    with pytest.raises(UserError, match=rf"but the model's limit is {limit} "
                                        r"\(max_position_embeddings\); shorten the prompt$"):
        traced.generate(eval_samples[0].image, "circle " * limit)
