"""transformers.js opens a Qwen2-VL export as it is (Qwen2VLProcessor and
Qwen2VLForConditionalGeneration, tests/js/answer.mjs) and answers as edgevlm.runtime does, token
for token, with the traced and the builder decoder, at fp32 and int4, on two image sizes that
give different image-token counts and M-RoPE grids.

For that the export names the vision graph's grid input `grid_thw`, as transformers.js feeds it
to a Qwen2-VL vision encoder (runtime.contract.PATCH_GRID_INPUTS), and mirrors the text sizes at
the top of config.json, where transformers.js reads them for model_type qwen2_vl
(export.manifest.FLAT_TEXT_SIZES). The builder decoder's KV buffers have no past-length axis:
transformers.js feeds a past of length 0 and grows it from each step's present, which
GroupQueryAttention takes as well.

The images are given at sizes the smart resize keeps (multiples of 28 px within the preset's
pixel bounds): transformers.js resizes with sharp and edgevlm with PIL, so what is compared is
the files and graphs, not two resamplers (tests/runtime/test_transformers_js.py). The question
holds the image as Qwen's processors take it, `<|vision_start|><|image_pad|><|vision_end|>`;
the runtime takes that text as it is. Needs node and tests/js/node_modules, as the other
transformers.js tests.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import tools

QUESTION = "<|vision_start|><|image_pad|><|vision_end|>\nWhat color is the circle?"
NEW_TOKENS = 8  # as answer.mjs asks transformers.js
# (width, height) -> image tokens: (h/28)·(w/28) after a smart resize that keeps the size
SIZES = {(84, 56): 6, (112, 140): 20}
EXPORTS = {"traced fp32": ("traced", "fp32"), "builder fp32": ("builder", "fp32"),
           "builder int4": ("builder", "int4")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    from edgevlm.models import PRESETS, init_model, save_model

    out = tmp_path_factory.mktemp("qwen_js") / "model"
    save_model(init_model(PRESETS["tiny-qwen2vl"], copy.deepcopy(tokenizer), seed=0), out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    out = []
    for w, h in SIZES:
        rng = np.random.default_rng(w * 1000 + h)
        path = tmp_path_factory.mktemp("qwen_js_images") / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(str(path))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_transformers_js_answers_as_the_runtime(name, model_dir, images, tmp_path):
    from transformers import AutoConfig

    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime import VLM

    decoder, precision = EXPORTS[name]
    out = tmp_path / "x"
    export(model_dir, out, ExportConfig(precision=precision, decoder=decoder, validate=False),
           quiet=True)
    manifest = json.loads((out / "edgevlm.json").read_text())
    assert manifest["decoder"]["kind"] == decoder
    assert list(manifest["io"]["vision_encoder"]["inputs"]) == ["pixel_values", "grid_thw"]
    # the flat sizes transformers.js reads leave transformers' own reading unchanged
    assert AutoConfig.from_pretrained(out).text_config.to_dict() == \
        AutoConfig.from_pretrained(model_dir).text_config.to_dict()
    proc = subprocess.run([tools.node(), str(tools.JS / "answer.mjs"), str(out), precision,
                           QUESTION, *images], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    vlm = VLM.load(out, provider="cpu", threads=1)
    eos = set(vlm.info.eos_token_ids)
    answers, lengths = set(), []
    for image, js in zip(images, theirs, strict=True):
        ours = vlm.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        assert js["prompt_tokens"] == ours.timings.n_prompt_tokens, image
        js_ids = js["ids"][:-1] if js["ids"] and js["ids"][-1] in eos else js["ids"]
        assert js_ids == list(ours.token_ids), image
        assert len(js_ids) >= 1
        answers.add(tuple(js_ids))
        lengths.append(js["prompt_tokens"])
    tokens = list(SIZES.values())
    assert lengths[1] - lengths[0] == tokens[1] - tokens[0]  # each image's own token count
    assert len(answers) == len(SIZES)  # the image reaches the answer
