"""onnxruntime-genai runs a Qwen2-VL export with images as it is written (edgevlm.export.genai_vlm):
its qwen2_5_vl pipeline (its own image processor, vision, embedding and decoder sessions, its own
M-RoPE positions) answers as edgevlm.runtime does, token for token, at fp32 and int4, and the
files added for it hold no weight bytes of their own."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from PIL import Image

from edgevlm.export import ExportConfig, export, genai_vlm
from edgevlm.runtime import contract

og = pytest.importorskip("onnxruntime_genai")

TOKENS = 8
SIZES = ((84, 56), (112, 140))  # multiples of 28 px: no resize, so no resizer can differ
QUESTION = "What color is the circle?"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>\n"  # Qwen's processors take it so


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    from edgevlm.models import PRESETS, init_model, save_model

    out = tmp_path_factory.mktemp("qwen2vl") / "model"
    save_model(init_model(PRESETS["tiny-qwen2vl"], copy.deepcopy(tokenizer), seed=0), out)
    return out


def _image(tmp_path, w: int, h: int):
    path = tmp_path / f"{w}x{h}.png"
    rng = np.random.default_rng(w * 1000 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _genai_greedy(model, processor, prompt: str, image) -> list[int]:
    inputs = processor(prompt, images=og.Images.open(str(image)) if image else None)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=256, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    out = []
    while len(out) < TOKENS:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def _own_bytes(path) -> tuple[int, set[str]]:
    """(weight bytes inside the graph file, the files its external tensors read)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inline = sum(len(t.raw_data) for t in graph.initializer)
    read = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return inline, read


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_answers_images_as_the_runtime(model_dir, tmp_path, precision):
    from edgevlm.runtime import VLM

    out = tmp_path / "out"
    export(model_dir, out, ExportConfig(precision=precision, validate=False), quiet=True)
    info = json.loads((out / contract.MANIFEST).read_text())
    entry = info["decoder"]["genai"]
    assert entry["type"] == "qwen2_5_vl" and entry["images"] and entry["reason"] is None
    assert info["decoder"]["genai_graph"] is None  # the decoder runs as it is
    model_cfg = json.loads((out / contract.GENAI_CONFIG).read_text())["model"]
    assert model_cfg["decoder"]["filename"] == info["components"]["decoder_model_merged"]["file"]
    assert {"inputs_embeds", "position_ids"} <= set(model_cfg["decoder"]["inputs"])
    assert model_cfg["vision"]["config_filename"] == genai_vlm.PROCESSOR_CONFIG

    # The added files are graphs and configs: every weight is read where the export keeps it.
    files = [out / f for f in entry["files"]]
    assert sum(f.stat().st_size for f in files) == entry["bytes"] < 150_000
    components = {c["file"].split("/")[-1] for c in info["components"].values()}
    for graph in files[:2]:
        inline, read = _own_bytes(graph)
        assert inline < 20_000 and read and read <= components | {
            f.name for f in (out / "onnx").glob("*_data")}
    assert sorted(p.name for p in (out / "onnx").glob("*_data")) == sorted(  # no new data file
        c["external_data"].split("/")[-1] for c in info["components"].values()
        if c["external_data"])
    assert not any(p.name.startswith("genai_decoder") for p in (out / "onnx").iterdir())

    genai = og.Model(str(out))
    processor = genai.create_multimodal_processor()
    vlm = VLM.load(out, provider="cpu", threads=1)
    for image in [*(_image(tmp_path, w, h) for w, h in SIZES), None]:
        question = IMAGE + QUESTION if image else QUESTION
        prompt = vlm.template.render(vlm.messages(image, question), add_generation_prompt=True)
        ours = vlm.generate(image, question, min_new_tokens=TOKENS, max_new_tokens=TOKENS)
        assert _genai_greedy(genai, processor, prompt, image) == list(ours.token_ids), image
        assert len(set(ours.token_ids)) > 1


def test_raw_data_spans_find_every_inline_tensor(tmp_path):
    """The wire-format reader finds each initializer's bytes at the offset it reports."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((16, 300)).astype(np.float32),
              "b": rng.integers(0, 9, (7,)).astype(np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 300])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    data = path.read_bytes()
    spans = genai_vlm.raw_data_spans(path)
    assert set(spans) == set(arrays)
    for name, (offset, length) in spans.items():
        assert data[offset:offset + length] == arrays[name].tobytes()


def test_windowed_vision_keeps_the_text_config_and_says_why():
    """Qwen2.5-VL's vision graph takes window inputs genai does not feed: no image pipeline."""
    def info(patches: str) -> dict:
        return {"family": "qwen2_vl", "image_processor": {"resample": 3},
                "io": {c: contract.graph_io(c, 2, decoder=contract.DecoderKind.BUILDER,
                                            patches=patches, mrope=True).to_dict()
                       for c in contract.COMPONENTS}}

    assert genai_vlm.unsupported(info("full")) is None
    assert "window_index" in genai_vlm.unsupported(info("windowed"))
    assert "PIL mode 1" in genai_vlm.unsupported({**info("full"),
                                                  "image_processor": {"resample": 1}})
