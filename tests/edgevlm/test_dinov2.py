"""DINOv2 under a LLaVA (CLS token, LayerScale, positions interpolated from the config's 518-px
grid to the processor's crop), beside CLIP and SigLIP: the image-token count follows the
processor, `init` from a LlavaConfig JSON or `--vision-from` a bare Dinov2Model folder, training,
`quantize --quantize-vision`, the default int4 and mobile exports with validation on, the runtime
against torch, `--visual-tokens` and transformers.js.

The towers are tiny (32 wide, 1 layer) with the real one's shape problem: config image_size 518
(a 37x37 grid) and a processor that crops SIDE px (4x4 patches of 14 px), as
facebook/dinov2-small's crops 224 (16x16)."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from tests import tools

DINOV2 = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 518, "patch_size": 14}
CONFIG = {
    "vision_config": DINOV2,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "max_position_embeddings": 512},
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}
SIDE, RESIZE = 56, 64  # the tiny processor: shortest edge 64, a 56 crop: 16 patches
TOKENS = (SIDE // 14) ** 2  # CLS dropped (strategy default)
QUESTION = "<image>\nWhat color is the circle?"


def _image_processor():
    from transformers import BitImageProcessorPil

    from edgevlm.families.llava import IMAGENET_MEAN, IMAGENET_STD

    return BitImageProcessorPil(size={"shortest_edge": RESIZE},
                                crop_size={"height": SIDE, "width": SIDE},
                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def _tower():
    """A random Dinov2Model whose LayerScale is not the identity."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    tower = Dinov2Model(Dinov2Config(**{k: v for k, v in DINOV2.items() if k != "model_type"}))
    with torch.no_grad():
        for layer in tower.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.2, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.2, 1.5)
    return tower.eval()


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A bare Dinov2Model folder with its processor, as benchmarks/models/dinov2.py writes."""
    out = tmp_path_factory.mktemp("dinov2") / "tower"
    _tower().save_pretrained(out)
    _image_processor().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A LLaVA built with transformers alone around the tower: LlavaConfig, LlavaProcessor."""
    import torch
    from transformers import (
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = copy.deepcopy(tokenizer)
    text = {k: v for k, v in CONFIG["text_config"].items() if k != "model_type"}
    cfg = LlavaConfig(
        vision_config=Dinov2Config(**{k: v for k, v in DINOV2.items() if k != "model_type"}),
        text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, **text),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.load_state_dict(_tower().state_dict())
    processor = LlavaProcessor(image_processor=_image_processor(), tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tok.chat_template)
    out = tmp_path_factory.mktemp("hf_dinov2") / "llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained_dir(hf_dir, shapes_dir, tmp_path_factory):
    from edgevlm import train
    from edgevlm.data import load_samples
    from edgevlm.models import load_model

    out = tmp_path_factory.mktemp("dinov2_trained") / "model"
    cfg = train.TrainConfig(stage="sft", steps=12, batch_size=4, lr=3e-3, warmup=2,
                            save_every=1000)
    result = train.run(load_model(hf_dir), load_samples(shapes_dir / "train.json"), out, cfg,
                       quiet=True)
    return out, result


@pytest.fixture(scope="module")
def eval_samples(shapes_dir):
    from edgevlm.data import load_samples

    return load_samples(shapes_dir / "eval.json")[:4]


def _torch_greedy(loaded, path, new_tokens: int) -> list[int]:
    """transformers' generate on the prompt edgevlm's data path makes."""
    import torch

    from edgevlm.data import Sample, pixel_inputs
    from edgevlm.evaluate import prompt_text

    tok = loaded.processor.tokenizer
    sample = Sample("s", path, ((QUESTION, ""),), "color")
    ids = torch.tensor([tok(prompt_text(loaded, sample), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gen = loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            **pixel_inputs(loaded.processor, [sample]), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)
    return gen[0, ids.shape[1]:].tolist()


def test_image_tokens_follow_the_processor_not_the_configs_grid(hf_dir, shapes_dir):
    """The count is the processor crop's patches (16), which transformers' own processor and
    model agree on; the config's 518 px would give 1369."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Dinov2Config, LlavaConfig

    from edgevlm.families.llava import image_processor_for
    from edgevlm.models import load_model, num_image_tokens

    loaded = load_model(hf_dir)
    assert loaded.num_image_tokens == TOKENS
    assert num_image_tokens(loaded.model.config) == 37 * 37  # the config's grid alone
    processor = AutoProcessor.from_pretrained(hf_dir)
    with Image.open(sorted((shapes_dir / "images").glob("*.png"))[0]) as im:
        inputs = processor(images=im.convert("RGB"), text=QUESTION, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (SIDE, SIDE)
    assert int((inputs["input_ids"] == loaded.image_token_id).sum()) == TOKENS
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**inputs).logits).all()
    # the processor a new DINOv2 LLaVA gets: facebook/dinov2-small's (256, crop 224, ImageNet)
    vision = Dinov2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1)
    images = image_processor_for(vision)
    assert type(images).__name__ == "BitImageProcessorPil"
    assert dict(images.crop_size)["height"] == 224 and dict(images.size)["shortest_edge"] == 256
    assert tuple(images.image_mean) == (0.485, 0.456, 0.406)
    config = LlavaConfig(vision_config=vision, vision_feature_select_strategy="default")
    assert num_image_tokens(config, images) == 256


@pytest.mark.slow
def test_init_from_a_llava_config_json_and_train(tmp_path, hf_dir, shapes_dir):
    """`edgevlm init --config` with a DINOv2 vision_config: 224-px processor, 256 tokens; a few
    training steps lower the loss."""
    from edgevlm import train
    from edgevlm.data import load_samples
    from edgevlm.models import create, load_model

    path = tmp_path / "llava.json"
    path.write_text(json.dumps(CONFIG))
    create(tmp_path / "m", config_path=path, tokenizer_from=hf_dir)
    loaded = load_model(tmp_path / "m")
    assert loaded.num_image_tokens == 256 and loaded.model.config.image_seq_length == 256
    assert dict(loaded.processor.image_processor.crop_size)["height"] == 224
    cfg = train.TrainConfig(stage="sft", steps=6, batch_size=2, lr=3e-3, warmup=1,
                            save_every=1000)
    result = train.run(loaded, load_samples(shapes_dir / "train.json")[:12], tmp_path / "t",
                       cfg, quiet=True)
    assert result.final_loss < result.history[0]["loss"]


def test_init_vision_from_a_bare_tower_or_a_llava(tmp_path, tower_dir, hf_dir):
    """--vision-from a Dinov2Model folder (every tensor is the tower's) or a LLaVA folder (its
    tower saved under DINOv2's original names, attention.attention.query, ...): the weights are
    the source's exactly, and the tower's own processor comes along (its crop sets the count)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from edgevlm.models import create, load_model

    path = tmp_path / "llava.json"
    path.write_text(json.dumps(CONFIG))
    want = _tower().state_dict()
    for name, src in (("bare", tower_dir), ("llava", hf_dir)):
        create(tmp_path / name, config_path=path, tokenizer_from=hf_dir, vision_from=src)
        loaded = load_model(tmp_path / name)
        got = loaded.model.model.vision_tower.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert loaded.num_image_tokens == TOKENS
        assert dict(loaded.processor.image_processor.crop_size)["height"] == SIDE
    ref = LlavaForConditionalGeneration.from_pretrained(hf_dir).model.vision_tower.state_dict()
    assert all(torch.equal(ref[k], want[k]) for k in want)


@pytest.mark.slow
def test_training_lowers_the_loss(trained_dir):
    _, result = trained_dir
    first = sum(h["loss"] for h in result.history[:3]) / 3
    assert result.final_loss < 0.7 * first, (first, result.final_loss)


@pytest.mark.slow
def test_default_int4_export_validates_and_the_runtime_answers_as_torch(trained_dir, tmp_path,
                                                                       eval_samples):
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM

    model_dir = trained_dir[0]
    result = export(model_dir, tmp_path / "int4", ExportConfig(precision="int4"), quiet=True)
    assert result.parity.passed, result.parity.failures
    manifest = json.loads((tmp_path / "int4" / "edgevlm.json").read_text())
    assert manifest["vision_model_type"] == "dinov2"
    assert manifest["vision_image_size"] == SIDE and manifest["vision_tokens"] == TOKENS
    proc = json.loads((tmp_path / "int4" / "processor_config.json").read_text())
    assert proc["num_additional_image_tokens"] == 0  # 16 patches, 16 tokens (CLS dropped)
    fp32 = tmp_path / "fp32"
    export(model_dir, fp32, ExportConfig(precision="fp32"), quiet=True)
    loaded = load_model(model_dir)
    vlm = VLM.load(fp32, provider="cpu", threads=1)
    for s in eval_samples[:3]:
        ours = vlm.generate(str(s.image), QUESTION, max_new_tokens=6, min_new_tokens=6)
        assert list(ours.token_ids) == _torch_greedy(loaded, s.image, 6)


@pytest.mark.slow
def test_mobile_export_interpolates_positions_into_a_table(trained_dir, tmp_path, eval_samples):
    """The mobile graphs (fp16) take the positions resized to the static 56-px grid as a
    constant (no Resize node), and validate against torch."""
    import onnx

    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    out = tmp_path / "mobile"
    result = export(trained_dir[0], out, ExportConfig(profile="mobile"), quiet=True)
    assert result.parity.passed, result.parity.failures
    assert result.parity.components["vision_encoder"].max_abs < 1e-3
    graph = onnx.load(str(out / result.components["vision_encoder"].file), load_external_data=False)
    assert not any(n.op_type == "Resize" for n in graph.graph.node)
    vlm = VLM.load(out, provider="cpu", threads=1)
    s = eval_samples[0]
    assert len(vlm.generate(str(s.image), QUESTION, max_new_tokens=4,
                            min_new_tokens=4).token_ids) == 4


@pytest.mark.slow
def test_quantize_the_tower(trained_dir, shapes_dir, tmp_path):
    """Q-VLM's vision step: the tower's 6 Linears are quantized beside the decoder's 14. Exporting
    the checkpoint is not possible yet (transformers cannot load it back); this test turns red
    the day it can, to be rewritten as an export that validates."""
    from edgevlm.export import ExportConfig, export
    from edgevlm.quant import QuantConfig, quantize
    from edgevlm.quant.checkpoint import packed_module_names

    q = quantize(trained_dir[0], tmp_path / "q", QuantConfig(
        method="qvlm", group_size=32, calib_samples=16, quantize_vision=True),
        calib=shapes_dir / "train.json")
    names = packed_module_names(q.out_dir)
    assert sum(".vision_tower." in n for n in names) == 6
    assert len(names) == 6 + 2 * 7
    # transformers 5.25 cannot load it back: dequantize-on-load copies each weight converter of
    # the model with the packed companions, and DINOv2's SwiGLU one (many-to-many) is refused;
    # a plain load then fails in Dinov2's _init_weights on the packed Linears (no `weight`)
    with pytest.raises(ValueError, match="one to many, one to one or many to one"):
        export(q.out_dir, tmp_path / "x", ExportConfig(precision="int4"), quiet=True)


@pytest.mark.slow
def test_fewer_visual_tokens_with_divprune(trained_dir, tmp_path, eval_samples):
    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    out = tmp_path / "x"
    export(trained_dir[0], out, ExportConfig(precision="fp32", visual_tokens=4,
                                             token_select="divprune"), quiet=True)
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["num_image_tokens"] == 4 and manifest["vision_tokens"] == TOKENS
    vlm = VLM.load(out, provider="cpu")
    ids = vlm._prepare(str(eval_samples[0].image), QUESTION, 0.0).ids
    assert int((ids == vlm.image_token_id).sum()) == 4
    assert len(vlm.generate(str(eval_samples[0].image), QUESTION, max_new_tokens=3,
                            min_new_tokens=3).token_ids) == 3


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_transformers_js_answers_as_the_runtime(precision, trained_dir, tmp_path, eval_samples):
    """transformers.js opens the export (BitImageProcessor, a 56 crop of a 64 shortest edge) and
    answers as edgevlm's runtime. Images are given at 64 px, so neither resizes (sharp and PIL
    resample differently) and only the crop, normalization and graphs are compared."""
    from PIL import Image

    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    node = tools.node()
    out = tmp_path / precision
    export(trained_dir[0], out, ExportConfig(precision=precision, validate=False), quiet=True)
    images = []
    for s in eval_samples[:2]:
        with Image.open(s.image) as im:
            im.convert("RGB").resize((RESIZE, RESIZE), Image.BICUBIC).save(tmp_path / s.image.name)
        images.append(str(tmp_path / s.image.name))
    proc = subprocess.run([node, str(tools.JS / "answer.mjs"), str(out), precision, QUESTION,
                           *images], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    vlm = VLM.load(out, provider="cpu", threads=1)
    eos = set(vlm.info.eos_token_ids)
    for image, js in zip(images, theirs, strict=True):
        ours = vlm.generate(image, QUESTION, max_new_tokens=8)
        assert js["prompt_tokens"] == ours.timings.n_prompt_tokens
        js_ids = js["ids"][:-1] if js["ids"] and js["ids"][-1] in eos else js["ids"]
        assert js_ids == list(ours.token_ids), image
