"""Qwen2-VL and Qwen2.5-VL behind the family adapter (issue 34): the tiny presets' prompts and
pixels are exactly what transformers' Qwen2VLProcessor makes on square, wide, tall, tiny and
large images; train and eval run with the model's own M-RoPE positions; export writes a patch
vision graph (one graph for every image size) and an M-RoPE decoder that pass validation at fp32
and int4, and the runtime's greedy answers equal transformers' on images of five sizes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import UserError
from edgevlm.families import family_of

PRESETS = {"qwen2_vl": "tiny-qwen2vl", "qwen2_5_vl": "tiny-qwen2.5vl"}
SIZES = {"square": (64, 64), "wide": (200, 60), "tall": (50, 170), "tiny": (10, 10),
         "large": (300, 280)}


def image(name: str) -> Image.Image:
    w, h = SIZES[name]
    rng = np.random.default_rng(w * 1000 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _init(tmp_path_factory, tokenizer, kind: str, seed: int = 0):
    from edgevlm.models import PRESETS as ALL
    from edgevlm.models import init_model, save_model

    out = tmp_path_factory.mktemp(kind) / "model"
    save_model(init_model(ALL[PRESETS[kind]], copy.deepcopy(tokenizer), seed=seed), out)
    return out


@pytest.fixture(scope="module", params=sorted(PRESETS))
def qwen_dir(request, tmp_path_factory, tokenizer):
    """An untrained tiny model of each kind: its greedy answers vary from token to token."""
    return _init(tmp_path_factory, tokenizer, request.param)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tokenizer, shapes_dir):
    from edgevlm.data import load_samples
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig, run

    start = _init(tmp_path_factory, tokenizer, "qwen2_vl")
    out = tmp_path_factory.mktemp("qwen_trained") / "model"
    result = run(load_model(start), load_samples(shapes_dir / "train.json"), out,
                 TrainConfig(stage="sft", steps=40, batch_size=8, lr=2e-3, warmup=5), quiet=True)
    return out, result


@pytest.mark.parametrize("name", sorted(SIZES))
def test_prompt_ids_and_pixels_equal_the_hf_processor(qwen_dir, tmp_path, name):
    from edgevlm.data import Collator, Sample
    from edgevlm.evaluate import prompt_text
    from edgevlm.models import load_model

    loaded = load_model(qwen_dir)
    path = tmp_path / f"{name}.png"
    image(name).save(path)
    sample = Sample("s", path, (("<image>\nWhat color is the circle?", "red"),), "color")
    ours = loaded.processor.tokenizer(prompt_text(loaded, sample), add_special_tokens=False)
    template = loaded.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat color is the circle?"}], tokenize=False,
        add_generation_prompt=True)
    hf = loaded.processor(text=[template.replace("<image>", "<|vision_start|><|image_pad|>"
                                                            "<|vision_end|>")],
                          images=[image(name)], return_tensors="pt", add_special_tokens=False)
    assert ours["input_ids"] == hf["input_ids"][0].tolist()
    t, h, w = hf["image_grid_thw"][0].tolist()
    assert ours["input_ids"].count(loaded.image_token_id) == t * h * w // 4
    assert 4 <= t * h * w // 4 <= loaded.num_image_tokens == 25  # min/max pixels of the preset
    batch = Collator(loaded.processor, loaded.num_image_tokens)([sample])
    assert np.array_equal(batch["pixel_values"].numpy(), hf["pixel_values"].numpy())
    assert batch["image_grid_thw"].tolist() == hf["image_grid_thw"].tolist()
    n = len(ours["input_ids"])
    assert batch["mm_token_type_ids"][0, :n].tolist() == hf["mm_token_type_ids"][0].tolist()


@pytest.mark.slow
def test_training_lowers_the_loss_and_eval_runs(trained_dir, shapes_dir):
    from edgevlm.data import load_samples
    from edgevlm.evaluate import evaluate
    from edgevlm.models import load_model

    out, result = trained_dir
    first = np.mean([h["loss"] for h in result.history[:5]])
    assert result.final_loss < 0.5 * first, (first, result.final_loss)
    scored = evaluate(load_model(out), load_samples(shapes_dir / "eval.json"), quiet=True)
    assert scored.score.total == 16
    assert all(p.prediction for p in scored.predictions)  # an answer for every question


def _torch_greedy(loaded, path, new_tokens: int) -> list[int]:
    """transformers' generate on the prompt edgevlm's data path makes, min_new_tokens so the
    end-of-sequence token is never picked (as the runtime's min_new_tokens)."""
    import torch

    from edgevlm.data import Sample, pixel_inputs, text_inputs
    from edgevlm.evaluate import prompt_text

    tok = loaded.processor.tokenizer
    sample = Sample("s", path, (("<image>\nWhat color is the circle?", ""),), "color")
    ids = torch.tensor([tok(prompt_text(loaded, sample), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gen = loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            **pixel_inputs(loaded.processor, [sample]), **text_inputs(loaded.processor, ids),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return gen[0, ids.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["builder", "traced"])
def test_runtime_answers_equal_transformers_on_five_image_sizes(qwen_dir, tmp_path, decoder):
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM

    out = tmp_path / "x"
    result = export(qwen_dir, out, ExportConfig(precision="fp32", decoder=decoder), quiet=True)
    assert result.parity.passed and result.parity.greedy.identical
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["decoder"]["kind"] == decoder
    vision_inputs = manifest["io"]["vision_encoder"]["inputs"]
    windowed = family_of(manifest["model_type"]).name == "qwen2_5_vl"
    assert ("window_index" in vision_inputs) == windowed
    vlm = VLM.load(out)
    loaded = load_model(qwen_dir)
    for name in SIZES:
        path = tmp_path / f"{name}.png"
        image(name).save(path)
        got = vlm.generate(path, "What color is the circle?", max_new_tokens=10,
                           min_new_tokens=10)
        want = _torch_greedy(loaded, path, 10)
        assert list(got.token_ids) == want, name
    assert len({tuple(vlm.generate(tmp_path / f"{n}.png", "What color is the circle?",
                                   max_new_tokens=10, min_new_tokens=10).token_ids)
                for n in SIZES}) > 1  # the image reaches the answer


@pytest.mark.slow
def test_int4_export_of_a_trained_model_passes_validation(trained_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    out = tmp_path / "x4"
    result = export(trained_dir[0], out, ExportConfig(precision="int4"), quiet=True)
    assert result.parity.passed
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["components"]["decoder_model_merged"]["precision"] == "int4"
    assert manifest["vision_int8"]["relative_error"] < 0.05
    assert manifest["io"]["decoder_model_merged"]["inputs"]["position_ids"] == \
        [3, "batch_size", "sequence_length"]


def test_mobile_profile_is_refused_by_name(qwen_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    with pytest.raises(UserError, match="--profile mobile fixes every graph's shapes.*qwen2(_5)?_vl"
                                        ".*default or gpu profile"):
        export(qwen_dir, tmp_path / "m", ExportConfig(profile="mobile"), quiet=True)
    assert not (tmp_path / "m").exists()


def test_a_video_config_and_bad_rope_sections_are_refused(tokenizer):
    from edgevlm.models import PRESETS as ALL
    from edgevlm.models import init_model

    cfg = copy.deepcopy(ALL["tiny-qwen2vl"])
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(UserError, match=r"mrope_section \[4, 4, 4\] sums to 12, not "
                                        r"head_dim/2 = 16"):
        init_model(cfg, copy.deepcopy(tokenizer))
    cfg = copy.deepcopy(ALL["tiny-qwen2vl"])
    cfg["input_modalities"] = ["image", "video"]
    with pytest.raises(UserError, match="video input is not supported yet"):
        init_model(cfg, copy.deepcopy(tokenizer))


def test_an_image_of_extreme_aspect_ratio_is_one_line(qwen_dir, tmp_path):
    from edgevlm.data import Collator, Sample
    from edgevlm.models import load_model

    loaded = load_model(qwen_dir)
    path = tmp_path / "strip.png"
    Image.new("RGB", (4020, 20)).save(path)
    sample = Sample("s", path, (("<image>\nWhat is it?", "a strip"),), "x")
    with pytest.raises(UserError, match="image of 4020x20.*crop it nearer to square"):
        Collator(loaded.processor, loaded.num_image_tokens).encode(sample)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq", "qvlm"])
def test_quantize_with_the_vision_tower_and_export_its_integers(trained_dir, shapes_dir,
                                                                 tmp_path, method):
    """Each method quantizes the decoder and (--quantize-vision) the tower and merger; the int4
    export carries the checkpoint's own integers (saved under Qwen2-VL's original key names,
    model.layers.* and visual.*) and passes validation against torch holding them."""
    from edgevlm.export import ExportConfig, export
    from edgevlm.quant import QuantConfig, quantize
    from edgevlm.quant.checkpoint import packed_module_names

    q = quantize(trained_dir[0], tmp_path / "q", QuantConfig(
        method=method, group_size=32, calib_samples=16, quantize_vision=True),
        calib=shapes_dir / "train.json")
    names = packed_module_names(q.out_dir)
    # 2 decoder layers x 7 Linears, 2 tower blocks x 4, the merger's 2
    assert len(names) == 24
    assert sum(n.startswith("model.visual.") for n in names) == 10
    assert all(n.startswith(("model.visual.", "model.language_model.")) for n in names)
    out = tmp_path / "x"
    result = export(q.out_dir, out, ExportConfig(precision="int4"), quiet=True)
    assert result.parity.passed and result.parity.greedy.identical
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["int4_source"] == "checkpoint"
    assert manifest["parity"]["graph_check"]["max_abs"] < 1e-4


@pytest.fixture(scope="module")
def small_student_dir(tmp_path_factory, tokenizer):
    """A narrower, one-layer Qwen2-VL under the same tower; the merger's output width follows
    the decoder's."""
    from edgevlm.models import PRESETS as ALL
    from edgevlm.models import init_model, save_model

    cfg = copy.deepcopy(ALL["tiny-qwen2vl"])
    cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1)
    del cfg["vision_config"]["hidden_size"]
    out = tmp_path_factory.mktemp("qwen_student") / "model"
    save_model(init_model(cfg, copy.deepcopy(tokenizer), seed=1), out)
    return out


@pytest.mark.slow
def test_llava_kd_between_two_qwen2_vl_models(trained_dir, small_student_dir, shapes_dir,
                                              tmp_path):
    from edgevlm import train
    from edgevlm.distill.stages import DistillConfig, distill
    from edgevlm.models import load_model

    cfg = DistillConfig(stages="dpt,sft,dft", dpt_steps=6, train=train.TrainConfig(
        steps=12, batch_size=8, lr=3e-3, warmup=2, save_every=100))
    res = distill(trained_dir[0], small_student_dir, shapes_dir / "train.json", tmp_path / "kd",
                  cfg, pretrain_data=shapes_dir / "pretrain.json", quiet=True)
    assert [r.stage for r in res.stages] == ["dpt", "sft", "dft"]
    final = load_model(tmp_path / "kd" / "final")
    assert final.model.config.text_config.hidden_size == 64
    assert final.model.config.vision_config.hidden_size == 64


def test_llava_mod_is_refused_by_name_and_a_wrong_merger_width_too(
        qwen_dir, small_student_dir, shapes_dir, tokenizer, tmp_path):
    from edgevlm.distill.mod import ModConfig, distill_mod
    from edgevlm.models import PRESETS as ALL
    from edgevlm.models import init_model

    with pytest.raises(UserError, match="no mixture-of-experts decoder for a qwen2_vl model.*"
                                        "--recipe llava-kd"):
        distill_mod(qwen_dir, small_student_dir, shapes_dir / "train.json",
                    tmp_path / "mod", ModConfig(), quiet=True)
    assert not (tmp_path / "mod").exists()
    cfg = copy.deepcopy(ALL["tiny-qwen2vl"])
    cfg["vision_config"]["hidden_size"] = 96
    with pytest.raises(UserError, match="vision_config.hidden_size 96 is the merger's output "
                                        "width and must equal text_config.hidden_size 128"):
        init_model(cfg, copy.deepcopy(tokenizer))


QWEN_VISION = {"model_type": "qwen2_vl",
               "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2,
                                 "patch_size": 14, "spatial_merge_size": 2,
                                 "temporal_patch_size": 2},
               "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}


def test_a_llama_lm_grafted_into_qwen2_vl_keeps_its_text_answers(tmp_path):
    """A Llama LM (here through GGUF, as SmolLM2 ships) becomes Qwen2-VL's decoder with zero
    q/k/v biases: on text, whose three position streams are equal, its logits and greedy
    answers are the LM's, in torch and in the exported graphs."""
    import torch

    from edgevlm.export import ExportConfig, export
    from edgevlm.models import create, load_model
    from edgevlm.runtime import VLM
    from tests.edgevlm.test_text_lm import text_logits, write_gguf

    lm, tok, path = write_gguf(tmp_path, tensor_type="F32")
    (tmp_path / "qwen.json").write_text(json.dumps(QWEN_VISION))
    create(tmp_path / "vlm", config_path=tmp_path / "qwen.json", text_from=path)
    loaded = load_model(tmp_path / "vlm")
    tc = loaded.model.config.text_config
    assert tc.model_type == "qwen2_vl_text" and tc.rope_parameters["mrope_section"] == [2, 3, 3]
    text = "the red circle is left of the blue square"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ours, ref = text_logits(loaded.model, ids), text_logits(lm, ids)
    assert (ours[:, : ref.shape[-1]] - ref).abs().max() < 1e-5
    with torch.no_grad():
        want = lm.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False)[0, len(ids):].tolist()
        got = loaded.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8,
                                    min_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert got == want
    out = tmp_path / "x"
    export(tmp_path / "vlm", out, ExportConfig(precision="fp32"), quiet=True)
    vlm = VLM.load(out)
    prompt = vlm.tokenizer.encode(vlm.template.render(vlm.messages(None, text),
                                                      add_generation_prompt=True))
    with torch.no_grad():
        want = lm.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False)[0, len(prompt):].tolist()
    assert list(vlm.generate(None, text, max_new_tokens=8, min_new_tokens=8).token_ids) == want


def test_an_lm_that_cannot_be_qwen2_vls_decoder_is_named():
    from edgevlm.families.qwen2_vl import text_config_from

    lm = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
    with pytest.raises(UserError, match="rope type 'llama3' has no M-RoPE form"):
        text_config_from(lm)
    with pytest.raises(UserError, match="a 'gemma' LM cannot become a Qwen2-VL decoder"):
        text_config_from({**lm, "model_type": "gemma"})
    with pytest.raises(UserError, match="head_dim 8 must be hidden_size / heads and a multiple "
                                        "of 16"):
        text_config_from({**lm, "hidden_size": 32, "rope_parameters": None})


@pytest.mark.slow
def test_pixel_bounds_at_export_and_at_load(trained_dir, tmp_path):
    """--max-pixels at export shrinks large images (recorded in edgevlm.json and the processor
    files, which transformers reads alike); VLM.load(max_pixels=) overrides it; a LLaVA export
    or a bad bound is one line."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    out = tmp_path / "x"
    export(trained_dir[0], out, ExportConfig(precision="fp32", max_pixels=28 * 28 * 9,
                                             min_pixels=28 * 28 * 4), quiet=True)
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["image_processor"]["size"] == {"shortest_edge": 3136, "longest_edge": 7056}
    assert manifest["num_image_tokens"] == 9
    hf = Qwen2VLImageProcessorPil.from_pretrained(out)
    path = tmp_path / "large.png"
    image("large").save(path)
    shrunk = int(hf(images=[image("large")], return_tensors="np")["image_grid_thw"].prod()) // 4
    assert shrunk == 6  # 300 x 280 px -> 84 x 56 px under 7,056 pixels
    small = VLM.load(out).generate(path, "What color is the circle?", max_new_tokens=2)
    big = VLM.load(out, max_pixels=28 * 28 * 25).generate(path, "What color is the circle?",
                                                          max_new_tokens=2)
    assert big.timings.n_prompt_tokens - small.timings.n_prompt_tokens == 20 - shrunk
    with pytest.raises(UserError, match="min_pixels"):
        VLM.load(out, min_pixels=28 * 28 * 30)  # over max_pixels
    with pytest.raises(UserError, match="--min-pixels 100000 is over --max-pixels 7056"):
        export(trained_dir[0], tmp_path / "bad", ExportConfig(min_pixels=100000,
                                                              max_pixels=7056), quiet=True)
    assert not (tmp_path / "bad").exists()


def test_pixel_bounds_on_a_llava_model_are_refused(micro_model_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    with pytest.raises(UserError, match="--min-pixels / --max-pixels bound a llava model's "
                                        "images only if"):
        export(micro_model_dir, tmp_path / "x", ExportConfig(max_pixels=50176), quiet=True)


@pytest.mark.slow
def test_bench_answers_the_eval_set_as_torch_and_plan_takes_the_report(trained_dir, shapes_dir,
                                                                        tmp_path):
    """`edgevlm bench` on a Qwen2-VL export and its torch model: the LLaVA-format questions'
    `<image>` is the family's placeholder in the runtime too, so every fp32 answer is torch's;
    `edgevlm plan` takes the reports."""
    from typer.testing import CliRunner

    from edgevlm.cli import app
    from edgevlm.export import ExportConfig, export

    export(trained_dir[0], tmp_path / "x", ExportConfig(precision="fp32"), quiet=True)
    run = CliRunner().invoke(app, ["bench", str(tmp_path / "x"), str(trained_dir[0]), "--data",
                                   str(shapes_dir / "eval.json"), "--timing-samples", "1",
                                   "--repeats", "1", "--max-new-tokens", "4", "--report",
                                   str(tmp_path / "r"), "--quiet"])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "r" / "bench.json").read_text())
    ours, torch_side = (t["predictions"] for t in report["targets"])
    assert [p["prediction"] for p in ours] == [p["prediction"] for p in torch_side]
    assert len(ours) == 16 and report["targets"][0]["family"] == "qwen2_vl"
    run = CliRunner().invoke(app, ["plan", "--reports", str(tmp_path / "r" / "bench.json"),
                                   "--out", str(tmp_path / "p")])
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["chosen"] is not None


def _torch_greedy_on_embeds(model, embeds, positions, delta: int, steps: int) -> list[int]:
    """transformers' decoder, fed embeddings and M-RoPE positions directly: greedy, cached."""
    import torch

    with torch.no_grad():
        out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        tokens, length = [], embeds.shape[1]
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            step = model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
            pos = torch.full((3, 1, 1), length + delta, dtype=torch.long)
            out = model(inputs_embeds=step, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
            length += 1
    return tokens


@pytest.mark.slow
def test_visual_tokens_keep_their_positions(qwen_dir, tmp_path):
    """--visual-tokens 6 on a 20-token image: the runtime keeps DivPrune's 6 merged tokens with
    the (t, h, w) positions they have in the whole image, the text after the image where it
    would be after all 20, and answers exactly as transformers' decoder fed those features at
    those positions; an image of at most 6 tokens is kept whole."""
    import torch

    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM, mrope
    from edgevlm.runtime.token_select import divprune

    out = tmp_path / "x"
    export(qwen_dir, out, ExportConfig(precision="fp32", visual_tokens=6,
                                       token_select="divprune"), quiet=True)
    vlm, loaded = VLM.load(out), load_model(qwen_dir)
    path = tmp_path / "large.png"
    image("large").save(path)  # 20 image tokens (grid 1 x 8 x 10)
    prepared = vlm._prepare(path, "What color is the circle?", 0.0)
    assert (prepared.ids == vlm.image_token_id).sum() == 6
    from edgevlm.data import Sample, pixel_inputs

    sample = Sample("s", path, (("<image>\nWhat color is the circle?", ""),), "color")
    pixels = pixel_inputs(loaded.processor, [sample])
    with torch.no_grad():
        feats = family_of(loaded.model).image_features(loaded.model, pixels)  # (20, D)
    kept = divprune(feats.numpy(), 6)
    rope = vlm._rope(prepared, kept)
    at = int(np.flatnonzero(prepared.ids == vlm.image_token_id)[0])
    full_ids = np.concatenate([prepared.ids[:at], np.full(20, vlm.image_token_id),
                               prepared.ids[at + 6:]])
    whole = mrope.rope_index(full_ids, vlm.image_token_id, [(1, 8, 10)], 2).positions
    assert np.array_equal(rope.positions[:, at:at + 6], whole[:, at + kept])  # image tokens
    assert np.array_equal(rope.positions[:, at + 6:], whole[:, at + 20:])  # text after it
    assert rope.delta == int(whole.max()) + 1 - len(prepared.ids)
    ids = torch.from_numpy(prepared.ids)[None]
    embeds = loaded.model.get_input_embeddings()(ids).detach()
    embeds[ids == vlm.image_token_id] = feats[torch.from_numpy(kept)]
    want = _torch_greedy_on_embeds(loaded.model, embeds, torch.from_numpy(rope.positions)[:, None],
                                   rope.delta, 8)
    got = vlm.generate(path, "What color is the circle?", max_new_tokens=8, min_new_tokens=8)
    assert list(got.token_ids) == want
    small = tmp_path / "square.png"
    image("square").save(small)  # 4 tokens: nothing to drop
    assert (vlm._prepare(small, "What color?", 0.0).ids == vlm.image_token_id).sum() == 4


def test_visionzip_is_refused_for_the_patch_family(qwen_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    with pytest.raises(UserError, match="visionzip ranks tokens by the tower's attention scores"
                                        ".*use divprune"):
        export(qwen_dir, tmp_path / "x", ExportConfig(visual_tokens=6, token_select="visionzip"),
               quiet=True)


@pytest.mark.slow
def test_an_8_bit_checkpoint_exports_its_integers_at_int8(trained_dir, shapes_dir, tmp_path):
    from edgevlm.export import ExportConfig, export
    from edgevlm.quant import QuantConfig, quantize

    q = quantize(trained_dir[0], tmp_path / "q", QuantConfig(method="gptq", bits=8, group_size=-1,
                                                             calib_samples=16),
                 calib=shapes_dir / "train.json")
    result = export(q.out_dir, tmp_path / "x", ExportConfig(precision="int8"), quiet=True)
    assert result.parity.passed
    manifest = json.loads((tmp_path / "x" / "edgevlm.json").read_text())
    assert manifest["int8_source"] == "checkpoint"
    assert manifest["parity"]["graph_check"]["max_abs"] < 1e-4


@pytest.mark.slow
def test_a_rope_type_the_builder_lacks_falls_back_to_the_traced_decoder(tokenizer, tmp_path):
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import PRESETS as ALL
    from edgevlm.models import init_model, save_model

    cfg = copy.deepcopy(ALL["tiny-qwen2vl"])
    cfg["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0,
                                             "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    save_model(init_model(cfg, copy.deepcopy(tokenizer)), tmp_path / "m")
    result = export(tmp_path / "m", tmp_path / "x", ExportConfig(precision="fp32"), quiet=True)
    assert result.decoder["kind"] == "traced" and result.parity.passed
    assert "rope type 'dynamic' is not implemented by the decoder builder" in \
        result.decoder["fallback_reason"]


@pytest.mark.slow
def test_a_briefly_trained_qwen2_5_vl_exports_at_fp32_and_int4(tmp_path_factory, tokenizer,
                                                               shapes_dir, tmp_path):
    """Qwen2.5-VL's windowed tower, trained a little so its answers are not noise, passes the
    export gate at fp32 (torch's greedy tokens) and at the default int4."""
    from edgevlm.data import load_samples
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig, run

    start = _init(tmp_path_factory, tokenizer, "qwen2_5_vl")
    run(load_model(start), load_samples(shapes_dir / "train.json"), tmp_path / "m",
        TrainConfig(stage="sft", steps=20, batch_size=8, lr=2e-3, warmup=5), quiet=True)
    fp32 = export(tmp_path / "m", tmp_path / "x32", ExportConfig(precision="fp32"), quiet=True)
    assert fp32.parity.passed and fp32.parity.greedy.identical
    int4 = export(tmp_path / "m", tmp_path / "x4", ExportConfig(precision="int4"), quiet=True)
    assert int4.parity.passed
    manifest = json.loads((tmp_path / "x4" / "edgevlm.json").read_text())
    assert "window_index" in manifest["io"]["vision_encoder"]["inputs"]
    assert manifest["parity"]["graph_check"]["matching_steps"] == \
        manifest["parity"]["graph_check"]["steps"]
