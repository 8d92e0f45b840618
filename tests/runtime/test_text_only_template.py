"""A language model whose chat template takes text only (SmolLM2's: `'...' + message['content']`)
under a vision tower, as `edgevlm init --text-from` makes it, answers the README's `edgevlm run`
line, `VLM.generate`, `VLM.stream` and examples/embed_runtime.py; so does an export of a model
whose template was never touched (the runtime puts the image tag in the text itself)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.runtime import VLM
from edgevlm.runtime.chat import ChatTemplate
from tests.edgevlm.test_text_lm import lm_tokenizer, save_lm, vision_config
from tests.runtime.test_examples import EXAMPLE, RUNNER

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json ships it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUESTION = "What color is the circle?"  # the README's run line


@pytest.fixture(scope="module")
def text_from_export(tmp_path_factory):
    """init --text-from a GGUF LM with SmolLM2's template, then export at the default int4."""
    from tests.edgevlm.gguf_file import write_llama_gguf

    tmp = tmp_path_factory.mktemp("smol")
    tok = lm_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    lm, tok = save_lm(tmp / "hf", tied=True, tokenizer=tok)
    (tmp / "gguf").mkdir()
    gguf = write_llama_gguf(lm, tok, tmp / "gguf" / "lm.gguf", tensor_type="F32")
    runner = CliRunner()
    made = runner.invoke(app, ["init", str(tmp / "model"), "--config",
                               str(vision_config(tmp)), "--text-from", str(gguf)])
    assert made.exit_code == 0, made.output
    out = runner.invoke(app, ["export", str(tmp / "model"), "--out", str(tmp / "x"),
                              "--precision", "int4", "--quiet"])
    assert out.exit_code == 0, out.output
    return tmp


@pytest.mark.slow
def test_the_lms_template_is_kept_behind_a_parts_prelude(text_from_export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_from_export / "model")
    assert tok.chat_template.endswith(SMOLLM2_TEMPLATE)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            f"Face<|im_end|>\n<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n"
            "<|im_start|>assistant\n")
    for messages in (parts, text):  # transformers and the runtime render both alike
        assert tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=True) == want
        assert ChatTemplate(tok.chat_template).render(messages) == want


def test_the_readme_run_line_answers(text_from_export, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(image)
    x = text_from_export / "x"
    result = CliRunner().invoke(app, ["run", str(x), "--image", str(image), "--prompt", QUESTION,
                                      "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    vlm = VLM.load(x)
    n_img = vlm.info.num_image_tokens
    answer = vlm.generate(str(image), QUESTION, max_new_tokens=4)
    assert report["text"] == answer.text
    assert report["timings"]["n_prompt_tokens"] == answer.timings.n_prompt_tokens
    # the system line, the question and the image's tokens are all in the prompt
    ids = vlm.tokenizer.encode(vlm.template.render(vlm.messages(str(image), QUESTION)))
    assert answer.timings.n_prompt_tokens == len(ids) - 1 + n_img
    stream = vlm.stream(str(image), QUESTION, max_new_tokens=4)
    assert "".join(stream).strip() == answer.text  # the result's text is stripped
    assert list(stream.result.token_ids) == list(answer.token_ids) == report["token_ids"]
    ran = subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLE), str(x), str(image),
                          "--question", QUESTION, "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert f"Q: {QUESTION}" in ran.stdout


def test_an_untouched_text_only_template_gets_the_tag_in_the_text(text_from_export, tmp_path):
    """An export made before init wrapped templates (or edited by hand) still answers."""
    import shutil

    from PIL import Image

    x = tmp_path / "x"
    shutil.copytree(text_from_export / "x", x)
    (x / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    info = json.loads((x / "edgevlm.json").read_text())
    if "chat_template" in info:
        info["chat_template"] = SMOLLM2_TEMPLATE
        (x / "edgevlm.json").write_text(json.dumps(info))
    vlm = VLM.load(x)
    assert vlm.template.source == SMOLLM2_TEMPLATE
    assert not vlm.template.takes_parts(vlm.image_tag)
    assert vlm.messages("img", QUESTION) == [{"role": "user",
                                              "content": f"{vlm.image_tag}\n{QUESTION}"}]
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (20, 30, 220)).save(image)
    assert vlm.generate(str(image), QUESTION, max_new_tokens=3).timings.n_new_tokens == 3
