"""Idefics3 / SmolVLM behind the family adapter (issue 17): the tiny-smolvlm preset's prompts
are exactly what transformers' Idefics3Processor makes (tiles with row/column markers and the
global image, splitting on and off, square, wide, tall and tiny images), and train, eval,
quantize (all three methods, vision tower included) and distill run on it; export writes the
SmolVLM ONNX layout and the runtime answers from it as transformers does."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from edgevlm.families import family_of
from tests.tools import without_notes


@pytest.fixture(scope="module")
def smolvlm_dir(tmp_path_factory, tokenizer):
    from edgevlm.models import PRESETS, init_model, save_model

    out = tmp_path_factory.mktemp("smolvlm") / "model"
    save_model(init_model(PRESETS["tiny-smolvlm"], copy.deepcopy(tokenizer), seed=0), out)
    return out


@pytest.fixture(scope="module")
def trained_dir(smolvlm_dir, shapes_dir, tmp_path_factory):
    from edgevlm.data import load_samples
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig, run

    out = tmp_path_factory.mktemp("smolvlm_trained") / "model"
    result = run(load_model(smolvlm_dir), load_samples(shapes_dir / "train.json"), out,
                 TrainConfig(stage="sft", steps=40, batch_size=8, lr=1e-3, warmup=5), quiet=True)
    return out, result


def images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)

    def img(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    return {"square": img(64, 64), "wide": img(150, 40), "tall": img(30, 100), "tiny": img(3, 2)}


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("name", ["square", "wide", "tall", "tiny"])
def test_prompt_ids_and_pixels_equal_the_hf_processor(smolvlm_dir, tmp_path, name, splitting):
    from edgevlm.data import Collator, Sample
    from edgevlm.evaluate import prompt_text
    from edgevlm.models import load_model

    loaded = load_model(smolvlm_dir)
    loaded.processor.image_processor.do_image_splitting = splitting
    image = images()[name]
    path = tmp_path / f"{name}.png"
    image.save(path)
    sample = Sample("s", path, (("<image>\nWhat color is the circle?", "red"),), "color")
    ours = loaded.processor.tokenizer(prompt_text(loaded, sample), add_special_tokens=False)
    template = loaded.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the circle?"}], tokenize=False,
        add_generation_prompt=True)
    hf = loaded.processor(text=[template], images=[[image]], return_tensors="pt",
                          add_special_tokens=False)
    assert ours["input_ids"] == hf["input_ids"][0].tolist()
    tiles = hf["pixel_values"].shape[1]
    assert tiles == (1 if not splitting else {"square": 5, "wide": 3, "tall": 3, "tiny": 5}[name])
    markers = sum(f"<row_{r}_col_{c}>" in prompt_text(loaded, sample)
                  for r in range(1, 7) for c in range(1, 7))
    assert markers == tiles - 1
    n_img = ours["input_ids"].count(loaded.image_token_id)
    assert n_img == tiles * loaded.num_image_tokens == tiles * 9
    batch = Collator(loaded.processor, loaded.num_image_tokens)([sample])
    assert np.array_equal(batch["pixel_values"][0].numpy(), hf["pixel_values"][0].numpy())
    assert np.array_equal(batch["pixel_attention_mask"][0].numpy(),
                          hf["pixel_attention_mask"][0].numpy())


def test_a_batch_mixing_text_only_and_image_samples(smolvlm_dir, shapes_dir):
    from edgevlm.data import Collator, Sample, load_samples
    from edgevlm.models import load_model

    loaded = load_model(smolvlm_dir)
    with_image = load_samples(shapes_dir / "eval.json")[0]
    text_only = Sample("t", None, (("Say red.", "red"),), "all")
    batch = Collator(loaded.processor, loaded.num_image_tokens)([text_only, with_image])
    assert tuple(batch["pixel_values"].shape[:2]) == (2, 5)
    assert float(batch["pixel_values"][0].abs().sum()) == 0.0  # dropped by the model
    out = loaded.model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    assert np.isfinite(float(out.loss.detach()))


@pytest.mark.slow
def test_train_eval_and_bench_on_the_tiny_smolvlm(trained_dir, shapes_dir):
    from edgevlm.data import load_samples
    from edgevlm.evaluate import evaluate
    from edgevlm.models import load_model

    out, report = trained_dir
    losses = [row["loss"] for row in json.loads((out / "train_log.json").read_text())]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    loaded = load_model(out)
    assert family_of(loaded.model).name == "idefics3"
    result = evaluate(loaded, load_samples(shapes_dir / "eval.json")[:16], max_new_tokens=4,
                      quiet=True)
    assert result.score.total == 16


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq", "qvlm"])
def test_quantize_every_method_with_the_vision_tower(method, trained_dir, shapes_dir, tmp_path):
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from edgevlm.models import load_model
    from edgevlm.quant import QuantConfig, QvlmConfig, quantize
    from edgevlm.quant.checkpoint import packed_module_names

    out = tmp_path / "q"
    quantize(trained_dir[0], out, QuantConfig(method=method, bits=4, group_size=32,
                                              calib_samples=8, batch_size=4,
                                              qvlm=QvlmConfig(clip_strengths=(0.0, 1.0)),
                                              quantize_vision=True),
             calib=shapes_dir / "train.json", quiet=True)
    names = packed_module_names(out)
    assert any(n.startswith("model.vision_model.") for n in names)
    assert sum(n.startswith("model.text_model.layers.") for n in names) == 2 * 7
    # a plain from_pretrained (symmetric, the default) decompresses on the first forward pass
    plain = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        plain(input_ids=torch.tensor([[1, 2, 3]]))
    ours = load_model(out, dequantize=True).model
    float_model = Idefics3ForConditionalGeneration.from_pretrained(trained_dir[0])
    for name in ("text_model.layers.0.mlp.down_proj", "vision_model.encoder.layers.1.mlp.fc1"):
        w_q = plain.model.get_submodule(name).weight
        assert torch.equal(w_q, ours.model.get_submodule(name).weight), name
        w_f = float_model.model.get_submodule(name).weight
        rel = float((w_q - w_f).detach().norm() / w_f.detach().norm())
        assert 0 < rel < 0.2, (name, rel)  # rounded to 4 bits, and close


@pytest.mark.slow
def test_distill_between_two_smolvlms(trained_dir, smolvlm_dir, shapes_dir, tmp_path):
    from edgevlm.distill import DistillConfig, distill
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig

    out = tmp_path / "d"
    distill(trained_dir[0], smolvlm_dir, shapes_dir / "train.json", out,
            DistillConfig(stages=("sft", "dft"),
                          train=TrainConfig(steps=5, batch_size=4, warmup=1)))
    assert family_of(load_model(out / "final").model).name == "idefics3"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_export_in_the_smolvlm_layout_answers_as_torch(precision, trained_dir, shapes_dir,
                                                       tmp_path):
    """vision_encoder takes pixel_values (B, N_tiles, 3, S, S) and pixel_attention_mask, gives
    every tile's tokens; the runtime splits the image and expands <image> itself, and its
    greedy answers equal transformers' (fp32; int4 passes the export's parity gate)."""
    import onnxruntime as ort

    from edgevlm.data import load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM

    out = tmp_path / "e"
    result = export(trained_dir[0], out, ExportConfig(precision=precision))
    assert result.parity.passed
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["family"] == "idefics3" and manifest["num_image_tokens"] == 9
    vision = ort.InferenceSession(str(out / manifest["components"]["vision_encoder"]["file"]))
    assert [i.name for i in vision.get_inputs()] == ["pixel_values", "pixel_attention_mask"]
    assert len(vision.get_inputs()[0].shape) == 5
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Idefics3Processor"
    if precision != "fp32":
        return
    vlm = VLM.load(out, provider="cpu")
    samples = load_samples(shapes_dir / "eval.json")[:8]
    want = generate_answers(load_model(trained_dir[0]), samples, max_new_tokens=6, tokens=True)
    got = [list(vlm.generate(str(s.image), s.turns[-1][0].replace("<image>\n", ""),
                             max_new_tokens=6).token_ids) for s in samples]
    assert got == want


@pytest.mark.slow
def test_a_splitting_mobile_export_needs_a_fixed_tile_count(smolvlm_dir, micro_model_dir,
                                                             tmp_path):
    from tests.reliability.test_outputs import run

    code, text = run("export", smolvlm_dir, "--out", tmp_path / "e", "--profile", "mobile")
    assert code == 2 and len(without_notes(text).splitlines()) == 1, text
    assert "fixed tile count" in text and "--no-image-splitting" in text
    assert not (tmp_path / "e").exists()
    code, text = run("export", micro_model_dir, "--out", tmp_path / "l", "--no-image-splitting")
    assert code == 2 and len(without_notes(text).splitlines()) == 1, text
    assert "llava model" in text and "drop the flag" in text
    assert not (tmp_path / "l").exists()


def test_the_mobile_profile_covers_smolvlm_at_one_tile(trained_dir, shapes_dir, tmp_path):
    """--profile mobile --no-image-splitting: static fp16 graphs, the vision encoder at one
    tile (1, 1, 3, S, S), parity with torch, NNAPI/CoreML readiness at the LLaVA targets, and
    the runtime's answers equal transformers' with splitting off."""
    import onnx

    from edgevlm.data import load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.export import ExportConfig, export, readiness
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM

    out = tmp_path / "m"
    result = export(trained_dir[0], out, ExportConfig(profile="mobile", image_splitting=False,
                                                      max_context=96, new_tokens=16))
    parity = result.parity
    assert parity.passed, parity.failures
    assert parity.greedy.matching_prefix == parity.greedy.new_tokens == 16
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["static_shapes"] == {"batch": 1, "image_size": 48, "context": 96,
                                         "step": 1, "tiles": 1}
    assert manifest["image_processor"]["do_image_splitting"] is False
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["do_image_splitting"] is False
    graph = onnx.load(str(out / result.components["vision_encoder"].file)).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["pixel_values"] == [1, 1, 3, 48, 48]
    assert dims["pixel_attention_mask"] == [1, 1, 48, 48]
    assert result.readiness.misses == []
    for component, (share, parts) in readiness.TARGETS.items():
        for ep in readiness.EPS:
            r = result.readiness.components[component][ep]
            assert r.share >= share and r.partitions <= parts, (component, ep, r)

    loaded = load_model(trained_dir[0])
    loaded.processor.image_processor.do_image_splitting = False
    samples = load_samples(shapes_dir / "eval.json")[:8]
    want = generate_answers(loaded, samples, max_new_tokens=6, tokens=True)
    vlm = VLM.load(out, provider="cpu")
    got = [list(vlm.generate(str(s.image), s.turns[-1][0].replace("<image>\n", ""),
                             max_new_tokens=6).token_ids) for s in samples]
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("model_type,precision", [("idefics3", "fp32"), ("idefics3", "int4"),
                                                ("smolvlm", "fp32")])
def test_transformers_js_opens_the_smolvlm_export(model_type, precision, trained_dir,
                                                  smolvlm_type_dir, shapes_dir, tmp_path):
    """transformers.js's Idefics3Processor and Idefics3ForConditionalGeneration (its
    SmolVLMForConditionalGeneration for model_type smolvlm) open the export as it is, split the
    image into the same tiles (same prompt length) and answer with the runtime's tokens. Images
    are given at 96 px, the size the processor resizes them to, so the two resamplers (sharp
    there, PIL here) differ only on the global tile."""
    import subprocess

    from edgevlm.data import load_samples
    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM
    from tests import tools
    from tests.runtime.test_transformers_js import JS, NEW_TOKENS, QUESTION

    node = tools.node()
    out = tmp_path / "e"
    model = trained_dir[0] if model_type == "idefics3" else smolvlm_type_dir / "trained"
    export(model, out, ExportConfig(precision=precision, validate=False))
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    images = []
    for s in load_samples(shapes_dir / "eval.json")[:3]:
        with Image.open(s.image) as im:
            im.convert("RGB").resize((96, 96), Image.BICUBIC).save(tmp_path / s.image.name)
        images.append(str(tmp_path / s.image.name))
    proc = subprocess.run([node, str(JS / "answer.mjs"), str(out), precision, QUESTION,
                           *images], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    vlm = VLM.load(out, provider="cpu", threads=1)
    eos = set(vlm.info.eos_token_ids)
    for image, js in zip(images, theirs, strict=True):
        ours = vlm.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        assert js["prompt_tokens"] == ours.timings.n_prompt_tokens == 74  # 5 tiles x 9 + text
        js_ids = js["ids"][:-1] if js["ids"] and js["ids"][-1] in eos else js["ids"]
        assert js_ids == list(ours.token_ids), image


@pytest.mark.slow
def test_a_distillation_pair_from_two_families_is_one_line(trained_dir, micro_model_dir,
                                                           shapes_dir, tmp_path):
    from tests.reliability.test_outputs import run

    code, text = run("distill", "--teacher", trained_dir[0], "--student", micro_model_dir,
                     "--data", shapes_dir / "train.json", "--out", tmp_path / "d",
                     "--stages", "sft", "--steps", "1")
    assert code == 2 and len(without_notes(text).splitlines()) == 1, text
    assert "the teacher is of the idefics3 family and the student of the llava family" in text
    assert not (tmp_path / "d").exists()


def test_quantize_then_export_int4_carries_the_integers(trained_dir, shapes_dir, tmp_path):
    from edgevlm.export import ExportConfig, export
    from edgevlm.quant import QuantConfig, quantize

    q = tmp_path / "q"
    quantize(trained_dir[0], q, QuantConfig(method="gptq", bits=4, group_size=32,
                                            calib_samples=8, batch_size=4),
             calib=shapes_dir / "train.json", quiet=True)
    result = export(q, tmp_path / "e", ExportConfig(precision="int4"))
    assert result.parity.passed
    manifest = json.loads((tmp_path / "e" / "edgevlm.json").read_text())
    assert manifest["int4_source"] and manifest["family"] == "idefics3"


@pytest.mark.parametrize("splitting", [True, False])
def test_runtime_prompt_ids_equal_the_hf_processor(splitting, trained_dir, tmp_path):
    """The runtime's own tiling and <image> expansion give the token ids transformers'
    processor gives, for square, wide, tall and tiny images; two images for one is refused."""
    import shutil

    from transformers import AutoProcessor

    from edgevlm.errors import UserError
    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    out = tmp_path / "e"
    export(trained_dir[0], out, ExportConfig(precision="fp32", validate=False))
    if not splitting:  # an export whose processor does not split
        for name in ("edgevlm.json", "preprocessor_config.json"):
            d = json.loads((out / name).read_text())
            (d["image_processor"] if name == "edgevlm.json" else d)["do_image_splitting"] = False
            (out / name).write_text(json.dumps(d))
        shutil.rmtree(out / "processor_config.json", ignore_errors=True)
    vlm = VLM.load(out, provider="cpu")
    hf = AutoProcessor.from_pretrained(out)
    hf.image_processor.do_image_splitting = splitting
    template = hf.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
        add_generation_prompt=True)
    for name, image in images().items():
        want = hf(text=[template], images=[[image]], add_special_tokens=False)["input_ids"][0]
        got = vlm._prepare(image, "<image>\nWhat is it?", 0.0).ids.tolist()
        assert got == list(want), name
    with pytest.raises(UserError, match="2 image placeholders for 1 image"):
        vlm.generate(images()["square"], "<image> and <image>?")


def test_visual_tokens_on_a_tiled_family_is_refused(smolvlm_dir, tmp_path):
    """SmolVLM's image tokens are tiles of a grid with row/column markers: fewer tokens per
    tile is not built yet, and export and train say so in one line."""
    from edgevlm.errors import UserError
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.models.token_reduce import check

    with pytest.raises(UserError, match="idefics3 family, whose image tokens come in tiles"):
        export(smolvlm_dir, tmp_path / "e",
               ExportConfig(precision="fp32", visual_tokens=4, token_select="divprune"))
    assert not (tmp_path / "e").exists()
    loaded = load_model(smolvlm_dir)
    with pytest.raises(UserError, match="this model is of the idefics3 family, whose image tokens"):
        check("divprune", 4, loaded.num_image_tokens, family_of(loaded.model))


@pytest.fixture(scope="module")
def smolvlm_type_dir(tokenizer, shapes_dir, tmp_path_factory):
    """The tiny-smolvlm preset as model_type smolvlm (SmolVLM2's classes), trained 20 steps."""
    from edgevlm.data import load_samples
    from edgevlm.models import PRESETS, init_model, load_model, save_model
    from edgevlm.train import TrainConfig, run

    cfg = copy.deepcopy(PRESETS["tiny-smolvlm"])
    cfg["model_type"] = "smolvlm"
    cfg["vision_config"]["model_type"] = "smolvlm_vision"
    root = tmp_path_factory.mktemp("smolvlm_type")
    save_model(init_model(cfg, copy.deepcopy(tokenizer), seed=0), root / "init")
    run(load_model(root / "init"), load_samples(shapes_dir / "train.json"), root / "trained",
        TrainConfig(stage="sft", steps=20, batch_size=8, lr=1e-3, warmup=5), quiet=True)
    return root


def test_smolvlm_model_type_is_the_same_model_end_to_end(smolvlm_type_dir, tokenizer,
                                                         shapes_dir, tmp_path):
    """model_type smolvlm: init from a SmolVLMConfig dict builds SmolVLMForConditionalGeneration,
    whose weights load strictly into the Idefics3 model and give the same logits; trained, it
    exports in the SmolVLM layout (parity passes) and the runtime's answers equal
    transformers'."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from edgevlm.data import Collator, load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import PRESETS, init_model, load_model
    from edgevlm.runtime import VLM

    smol = load_model(smolvlm_type_dir / "init")
    assert type(smol.model) is SmolVLMForConditionalGeneration
    assert family_of(smol.model).name == "idefics3"
    idefics = init_model(PRESETS["tiny-smolvlm"], copy.deepcopy(tokenizer), seed=1)
    idefics.model.load_state_dict(smol.model.state_dict(), strict=True)
    samples = load_samples(shapes_dir / "eval.json")[:4]
    batch = Collator(smol.processor, smol.num_image_tokens)(samples)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(smol.model(**batch).logits, idefics.model(**batch).logits)

    trained = smolvlm_type_dir / "trained"
    out = tmp_path / "e"
    result = export(trained, out, ExportConfig(precision="fp32"))
    assert result.parity.passed, result.parity.failures
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["family"] == "idefics3"
    assert json.loads((out / "config.json").read_text())["model_type"] == "smolvlm"
    loaded = load_model(trained)
    assert type(loaded.model) is SmolVLMForConditionalGeneration
    want = generate_answers(loaded, samples, max_new_tokens=6, tokens=True)
    vlm = VLM.load(out, provider="cpu")
    got = [list(vlm.generate(str(s.image), s.turns[-1][0].replace("<image>\n", ""),
                             max_new_tokens=6).token_ids) for s in samples]
    assert got == want
