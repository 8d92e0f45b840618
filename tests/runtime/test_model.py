"""VLM on an fp32 export: token-for-token parity with transformers, KV cache, threads, errors."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.contract import FORMAT_VERSION, MANIFEST

NEW_TOKENS = 10


def _reference(model_dir, samples):
    from edgevlm.evaluate import generate_answers
    from edgevlm.models import load_model

    loaded = load_model(model_dir)
    ids = generate_answers(loaded, samples, NEW_TOKENS, tokens=True)
    texts = generate_answers(loaded, samples, NEW_TOKENS)
    return loaded, ids, texts


@pytest.fixture(scope="module")
def torch_reference(model_dir, eval_samples):
    return _reference(model_dir, eval_samples)


def _assert_parity(vlm, samples, ref_ids, ref_texts):
    assert len({tuple(i) for i in ref_ids}) > 1, "answers should differ between images"
    for sample, ids, text in zip(samples, ref_ids, ref_texts, strict=True):
        # The sample's question holds "<image>\n", as in the LLaVA data the reference renders.
        out = vlm.generate(sample.image, sample.question, max_new_tokens=NEW_TOKENS)
        assert list(out.token_ids) == ids, sample.id
        assert out.text == text
        assert out.finish_reason == ("eos" if len(ids) < NEW_TOKENS else "length")


def test_greedy_equals_transformers_generate(vlm, eval_samples, torch_reference):
    _assert_parity(vlm, eval_samples, *torch_reference[1:])


def test_clip_tower_equals_transformers_generate(clip_pair, eval_samples):
    model_dir, export_dir = clip_pair
    samples = eval_samples[:4]
    _, ids, texts = _reference(model_dir, samples)
    _assert_parity(VLM.load(export_dir, provider="cpu"), samples, ids, texts)


def test_end_of_sequence_stops(export_dir, tmp_path, eval_samples, vlm):
    """Make the 4th greedy token the end-of-sequence token: the answer stops right before it."""
    s = eval_samples[0]
    full = vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS).token_ids
    assert len(full) == NEW_TOKENS
    eos_dir = _copy(export_dir, tmp_path / "eos")
    m = json.loads((eos_dir / MANIFEST).read_text())
    (eos_dir / MANIFEST).write_text(json.dumps({**m, "eos_token_id": [m["eos_token_id"],
                                                                      full[3]]}))
    eos_vlm = VLM.load(eos_dir)
    out = eos_vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS)
    assert out.finish_reason == "eos"
    assert out.token_ids == full[: full.index(full[3])]
    # min_new_tokens keeps end-of-sequence out of the first N picks: exactly N tokens, none of
    # them an end-of-sequence id, the same prefix as before.
    stop = full.index(full[3])
    forced = eos_vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS)
    assert len(forced.token_ids) == NEW_TOKENS and forced.finish_reason == "length"
    assert forced.token_ids[:stop] == full[:stop]
    assert full[3] not in forced.token_ids
    with pytest.raises(UserError, match="min_new_tokens=11 must be an integer from 0 to "
                                        "max_new_tokens"):
        eos_vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS, min_new_tokens=11)


def test_plain_prompt_gets_the_image_part(vlm, eval_samples, torch_reference):
    _, ref_ids, _ = torch_reference
    sample = eval_samples[0]
    question = sample.question.replace("<image>\n", "")
    as_string = vlm.generate(sample.image, question, max_new_tokens=NEW_TOKENS)
    as_parts = vlm.generate(sample.image, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], max_new_tokens=NEW_TOKENS)
    assert list(as_string.token_ids) == list(as_parts.token_ids) == ref_ids[0]


def test_text_only_equals_transformers(vlm, torch_reference):
    import torch

    loaded = torch_reference[0]
    tok = loaded.processor.tokenizer
    msgs = [{"role": "user", "content": "What shapes are there?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        gen = loaded.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    expected = [t for t in gen[0, len(ids):].tolist()]
    expected = expected[: expected.index(tok.eos_token_id)] if tok.eos_token_id in expected \
        else expected
    assert list(vlm.generate(None, msgs, max_new_tokens=NEW_TOKENS).token_ids) == expected


def test_cache_feeds_one_token_per_step(vlm, eval_samples, monkeypatch):
    seen = []
    real = vlm._decode

    def spy(embeds, start, past, positions=None):
        assert positions is None  # a 1-D (llava) decoder
        seen.append((embeds.shape[1], start, past[0].shape()[2]))
        return real(embeds, start, past, positions)

    monkeypatch.setattr(vlm, "_decode", spy)
    out = vlm.generate(eval_samples[0].image, eval_samples[0].question, max_new_tokens=6)
    n = out.timings.n_prompt_tokens
    # The builder decoder's KV buffers keep their length (the export's max_context); the
    # attention mask's width, start + 1, says how many positions are filled.
    size = vlm.info.context
    assert vlm.info.decoder == "builder" and size == 256
    assert seen[0] == (n, 0, size)  # prefill: the whole prompt from position 0
    assert seen[1:] == [(1, n + k, size) for k in range(len(seen) - 1)]


def test_chunked_prefill_is_exact(export_dir, vlm, eval_samples, torch_reference):
    chunked = VLM.load(export_dir, provider="cpu", prefill_chunk=5)
    for sample, ids in zip(eval_samples[:3], torch_reference[1], strict=False):
        assert list(chunked.generate(sample.image, sample.question,
                                     max_new_tokens=NEW_TOKENS).token_ids) == ids
    with pytest.raises(UserError, match="prefill_chunk"):
        VLM.load(export_dir, prefill_chunk=0)


def test_stream_pieces_and_timings(vlm, eval_samples):
    sample = eval_samples[1]
    stream = vlm.stream(sample.image, sample.question, max_new_tokens=NEW_TOKENS)
    pieces = list(stream)
    result = stream.result
    assert "".join(pieces).strip() == result.text
    assert result.text == vlm.generate(sample.image, sample.question,
                                       max_new_tokens=NEW_TOKENS).text
    t = result.timings
    assert t.n_prompt_tokens == len(vlm.tokenizer.encode(vlm.template.render(
        vlm.messages(sample.image, sample.question)))) + vlm.info.num_image_tokens - 1
    assert t.n_new_tokens == len(result.token_ids)
    assert 0 < t.preprocess_s and 0 < t.vision_s and 0 < t.prefill_s and 0 < vlm.load_s
    assert t.preprocess_s + t.vision_s + t.prefill_s <= t.ttft_s <= t.total_s
    if t.n_new_tokens > 1:
        assert t.decode_tokens_per_s > 0


def test_stop_strings_cut_the_answer(vlm, eval_samples):
    answers = ((s, vlm.tokenizer.decode(vlm.generate(s.image, s.question,
                                                     max_new_tokens=NEW_TOKENS).token_ids))
               for s in eval_samples)
    sample, text = next(((s, t) for s, t in answers if len(t) >= 4), (None, ""))
    assert sample is not None, "no eval answer is long enough to cut (4 characters)"
    stop = text[2:4]
    cut = vlm.generate(sample.image, sample.question, max_new_tokens=NEW_TOKENS, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)].strip()
    assert stop not in "".join(vlm.stream(sample.image, sample.question, stop=stop))


def test_sampling_is_seeded_per_call(vlm, eval_samples):
    s = eval_samples[3]
    kw = {"max_new_tokens": 8, "temperature": 1.5, "top_p": 0.9}
    a = vlm.generate(s.image, s.question, seed=7, **kw).token_ids
    assert vlm.generate(s.image, s.question, seed=7, **kw).token_ids == a
    greedy = vlm.generate(s.image, s.question, max_new_tokens=8).token_ids
    assert vlm.generate(s.image, s.question, max_new_tokens=8, temperature=2.0, top_k=1,
                        seed=3).token_ids == greedy


def test_threads_get_their_own_answers(vlm, eval_samples):
    def answer(sample):
        return vlm.generate(sample.image, sample.question, max_new_tokens=NEW_TOKENS).token_ids

    serial = [answer(s) for s in eval_samples]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(answer, eval_samples * 2))
    assert parallel == serial * 2


def test_bad_call_inputs(vlm, eval_samples, tmp_path):
    image = eval_samples[0].image
    with pytest.raises(UserError, match="max_new_tokens"):
        vlm.generate(image, "What?", max_new_tokens=0)
    not_image = tmp_path / "answer.jpg"
    not_image.write_text("not a jpeg")
    with pytest.raises(UserError, match="answer.jpg"):
        vlm.generate(not_image, "What?")
    limit = vlm.info.max_tokens  # the builder's KV buffer: min(max_position_embeddings, 2048)
    assert limit == vlm.info.context == 256
    with pytest.raises(UserError, match=rf"is \d+ tokens.*KV buffer holds {limit} positions.*"
                                        "--max-context"):
        vlm.generate(image, "circle " * limit)
    with pytest.raises(UserError, match="image placeholder"):
        vlm.generate(image, [{"role": "user", "content": "What color?"}])
    with pytest.raises(UserError, match="no image was given"):
        vlm.generate(None, "<image>\nWhat color?")
    with pytest.raises(UserError, match="top_p"):
        vlm.generate(image, "What?", temperature=1.0, top_p=0)


def _copy(export_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)
    return out


def test_bad_exports(export_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        VLM.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not an edgevlm export"):
        VLM.load(tmp_path)
    newer = _copy(export_dir, tmp_path / "newer")
    manifest = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="newer edgevlm"):
        VLM.load(newer)
    corrupt = _copy(export_dir, tmp_path / "corrupt")
    graph = corrupt / manifest["components"]["decoder_model_merged"]["file"]
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    with pytest.raises(UserError, match="decoder_model_merged.onnx"):
        VLM.load(corrupt)
    with pytest.raises(UserError, match="no int4 graphs.*fp32"):
        VLM.load(export_dir, precision="int4")
    with pytest.raises(UserError, match="threads"):
        VLM.load(export_dir, threads=0)


def test_unavailable_provider(export_dir):
    from edgevlm.runtime.session import PROVIDERS, available

    missing = [p for p in PROVIDERS if p not in available()]
    if not missing:
        pytest.skip("every provider is installed here")
    with pytest.raises(UserError, match="pip install|onnxruntime-"):
        VLM.load(export_dir, provider=missing[0])


def test_manifest_fallbacks(export_dir, tmp_path, eval_samples):
    """An export whose manifest lacks the optional keys still loads from the copied files."""
    lean = _copy(export_dir, tmp_path / "lean")
    m = json.loads((lean / MANIFEST).read_text())
    keep = {"format_version", "components", "decoder"}  # a builder decoder's kind is required
    (lean / MANIFEST).write_text(json.dumps({k: v for k, v in m.items() if k in keep}))
    # The end token then comes from tokenizer_config.json, the image settings from
    # preprocessor_config.json.
    (lean / "generation_config.json").unlink()
    (lean / "processor_config.json").unlink()
    config = json.loads((lean / "config.json").read_text())
    config["text_config"].pop("eos_token_id", None)
    (lean / "config.json").write_text(json.dumps(config))
    s = eval_samples[0]
    lean_vlm = VLM.load(lean)
    assert lean_vlm.info.eos_token_ids == (json.loads(
        (export_dir / MANIFEST).read_text())["eos_token_id"],)
    a = lean_vlm.generate(s.image, s.question, max_new_tokens=4)
    b = VLM.load(export_dir).generate(s.image, s.question, max_new_tokens=4)
    assert a.token_ids == b.token_ids
    assert np.isfinite(a.timings.total_s)


def test_precision_of_a_mixed_export_means_its_decoder(model_dir, tmp_path):
    """`--precision int4` writes an int8 vision encoder beside the int4 decoder; asking the
    runtime for int4 loads that export as written, another precision names what is there."""
    from edgevlm.export import ExportConfig, export

    out = export(model_dir, tmp_path / "q4", ExportConfig(precision="int4", validate=False))
    vlm = VLM.load(out.out_dir, provider="cpu", precision="int4")
    assert vlm.info.graphs["vision_encoder"].name == "vision_encoder_int8.onnx"
    assert vlm.info.graphs["decoder_model_merged"].name == "decoder_model_merged_q4.onnx"
    assert vlm.info.precision == "mixed"
    with pytest.raises(UserError, match="has no fp16 graphs"):
        VLM.load(out.out_dir, provider="cpu", precision="fp16")
