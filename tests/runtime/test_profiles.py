"""Mobile and gpu exports through the same VLM.load: same greedy answers as the default export
on the shapes eval, the fixed context and image size of a mobile export, TensorRT options."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.session import TensorrtConfig, provider_chain, resolve

NEW_TOKENS = 8
CONTEXT = 48  # the prompts are ~33 tokens with the 9 image tokens


def _export(root, model_dir, profile: str, validate: bool = False, **kw):
    from edgevlm.export import ExportConfig, export

    out = root / profile
    export(model_dir, out, ExportConfig(profile=profile, validate=validate, readiness=False,
                                         **kw))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, model_dir, export_dir):
    root = tmp_path_factory.mktemp("profiles")
    return {"default": export_dir,
            "mobile": _export(root, model_dir, "mobile", max_context=CONTEXT),
            "gpu": _export(root, model_dir, "gpu", validate=True)}


@pytest.fixture(scope="module")
def exports_fp16_gpu(tmp_path_factory, model_dir):
    return _export(tmp_path_factory.mktemp("gpu16"), model_dir, "gpu", precision="fp16")


@pytest.fixture(scope="module")
def answers(exports, eval_samples):
    out = {}
    for profile, path in exports.items():
        vlm = VLM.load(path, provider="cpu", threads=1)
        results = [vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS)
                   for s in eval_samples]
        out[profile] = (vlm, results)
    return out


def test_mobile_gives_the_default_exports_greedy_answers(answers):
    _, default = answers["default"]
    vlm, mobile = answers["mobile"]
    assert vlm.info.profile == "mobile" and vlm.info.context == CONTEXT
    assert len({r.token_ids for r in default}) > 1, "answers should differ between images"
    assert [r.token_ids for r in mobile] == [r.token_ids for r in default]


def test_gpu_export_matches_the_default_export_part_by_part(answers, exports, eval_samples):
    """fp16 vision and embedding graphs against the default export's fp32 ones on the eval
    images and prompts; the int4 decoder against torch carrying the same integers (the export's
    own parity check, run here). Greedy tokens of this random model are not compared: rounding
    its decoder to int4 moves near-tied logits (the trained teacher keeps 299 of 300 eval
    answers, benchmarks/results/profiles_teacher/)."""
    from edgevlm.runtime.preprocess import load_image, preprocess

    base, _ = answers["default"]
    vlm, _ = answers["gpu"]
    assert vlm.info.precision == "mixed"  # fp16 vision and embedding, int4 decoder
    for s in eval_samples[:4]:
        pixels = preprocess(load_image(s.image), vlm.info.image_processor)
        ref = base._vision.run(None, {"pixel_values": pixels.astype(np.float32)})[0]
        got = vlm._vision.run(None, {"pixel_values": pixels.astype(np.float32)})[0]
        assert np.abs(got - ref).max() <= 5e-3 * np.abs(ref).max(), s.image
        ids = np.asarray([vlm.tokenizer.encode(s.question)], np.int64)
        ref = base._embed.run(None, {"input_ids": ids})[0]
        got = vlm._embed.run(None, {"input_ids": ids})[0]
        assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()
    parity = json.loads((exports["gpu"] / "edgevlm.json").read_text())["parity"]
    check = parity["graph_check"]  # fp16 activations: fp16's tolerance, not fp32's
    assert parity["passed"] and check["max_abs"] < check["tolerance"]
    assert check["matching_steps"] == check["steps"] >= NEW_TOKENS


def test_gpu_profile_with_fp16_decoder_gives_the_same_answers(exports_fp16_gpu, answers,
                                                               eval_samples):
    _, default = answers["default"]
    vlm = VLM.load(exports_fp16_gpu, provider="cpu", threads=1)
    got = [vlm.generate(s.image, s.question, max_new_tokens=NEW_TOKENS).token_ids
           for s in eval_samples]
    assert sum(g == d.token_ids for g, d in zip(got, default, strict=True)) >= len(default) - 1


def test_mobile_rejects_a_prompt_longer_than_its_context(answers, eval_samples):
    vlm = answers["mobile"][0]
    long = "Describe every shape. " * 10
    with pytest.raises(UserError, match=f"fixed context is {CONTEXT}.*--max-context"):
        vlm.generate(eval_samples[0].image, long)
    # The answer stops at the last cache slot instead of overrunning it.
    out = vlm.generate(eval_samples[0].image, eval_samples[0].question, max_new_tokens=100)
    assert out.timings.n_prompt_tokens + out.timings.n_new_tokens <= CONTEXT
    assert out.finish_reason in ("length", "eos")


def test_mobile_resizes_another_image_size_and_says_so(answers, eval_samples):
    vlm = answers["mobile"][0]
    sample = eval_samples[0]
    native = vlm.generate(sample.image, sample.question, max_new_tokens=2)
    assert native.timings.image_resized_from is None  # shapes images are 48 px, the fixed size
    big = Image.new("RGB", (96, 64), "blue")
    out = vlm.generate(big, sample.question, max_new_tokens=2)
    assert out.timings.image_resized_from == (96, 64)
    assert len(out.token_ids) == 2


def test_mobile_export_reads_back_its_manifest(exports):
    manifest = json.loads((exports["mobile"] / "edgevlm.json").read_text())
    assert manifest["profile"] == "mobile" and manifest["static_shapes"]["context"] == CONTEXT
    broken = dict(manifest, rope_file="onnx/missing.npy")
    (exports["mobile"] / "edgevlm.json").write_text(json.dumps(broken))
    try:
        with pytest.raises(UserError, match="rope_cos_sin.npy"):
            VLM.load(exports["mobile"], provider="cpu")
    finally:
        (exports["mobile"] / "edgevlm.json").write_text(json.dumps(manifest))


def test_tensorrt_options_cache_engines_and_fall_back_to_cuda(tmp_path):
    trt = TensorrtConfig(tmp_path / "engines", fp16=True)
    provider = resolve("cpu")
    assert provider_chain(provider, trt) == ["CPUExecutionProvider"]
    from edgevlm.runtime.session import PROVIDERS, Provider

    chain = provider_chain(Provider("tensorrt", PROVIDERS["tensorrt"]), trt)
    name, options = chain[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert options["trt_fp16_enable"] == "True"
    assert (tmp_path / "engines").is_dir()
    assert chain[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in ort.get_all_providers()


def test_gpu_export_on_a_missing_provider_names_the_package(exports):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(UserError, match="onnxruntime-gpu"):
            VLM.load(exports["gpu"], provider=provider)


def test_kv_cache_stays_in_ort_values_between_steps(answers, eval_samples):
    """The gpu path binds the KV buffers as OrtValues on the provider's device; on CPU the same
    code runs: each step writes its keys and values into the buffers it was given, in place, and
    hands back those same OrtValues (never a numpy copy)."""
    vlm = answers["gpu"][0]
    assert vlm.info.decoder == "builder"
    embeds = vlm._embed_ids(np.asarray([1, 2, 3], np.int64))
    cache = vlm._new_cache()
    logits, past = vlm._decode(embeds, 0, cache)
    assert past is cache and all(isinstance(p, ort.OrtValue) for p in past)
    assert past[0].shape()[2] == vlm.info.context and past[0].device_name() == "cpu"
    keys = past[0].numpy()  # (1, kv, context, hd): positions 0..2 written, 3 still empty
    assert np.abs(keys[0, :, :3]).min() > 0 and not keys[0, :, 3:].any()
    _, past2 = vlm._decode(vlm._embed_ids(np.asarray([4], np.int64)), 3, past)
    assert past2 is cache and np.abs(past2[0].numpy()[0, :, 3]).min() > 0
    assert np.array_equal(past2[0].numpy()[0, :, :3], keys[0, :, :3])
    assert logits.ndim == 1 and np.isfinite(logits).all()


def test_each_export_opens_its_decoder_backend_once(answers):
    """A mobile export runs its static graphs behind the same Decoder interface (a fixed cache
    filled in place, by position); the others run the decoder their manifest names."""
    from edgevlm.runtime.decoders import BuilderDecoder, StaticDecoder, TracedDecoder

    for profile, (vlm, _) in answers.items():
        want = (StaticDecoder if profile == "mobile" else
                BuilderDecoder if vlm.info.decoder == "builder" else TracedDecoder)
        assert type(vlm._backend) is want, profile
    vlm, base = answers["mobile"][0], answers["default"][0]
    cache = vlm._new_cache()
    assert cache.filled == 0 and {t.shape[2] for t in cache.tensors.values()} == {CONTEXT}
    logits, same = vlm._decode(vlm._embed_ids(np.asarray([1, 2, 3], np.int64)), 0, cache)
    assert same is cache and cache.filled == 3 and logits.ndim == 1
    keys = next(iter(cache.tensors.values()))  # (1, kv, C, hd): slots 0..2 written, 3.. empty
    assert np.abs(keys[0, :, :3]).min() > 0 and not keys[0, :, 3:].any()
    logits, same = vlm._decode(vlm._embed_ids(np.asarray([4], np.int64)), 3, cache)
    assert same is cache and cache.filled == 4 and np.abs(keys[0, :, 3]).min() > 0
    # the same four tokens in one pass of the default export's decoder, within the fp16
    # tolerance the mobile graphs are held to (tests/export/test_mobile.py)
    ref, _ = base._decode(base._embed_ids(np.asarray([1, 2, 3, 4], np.int64)), 0,
                          base._new_cache())
    assert np.abs(logits - ref).max() <= 2e-3 * np.abs(ref).max()
