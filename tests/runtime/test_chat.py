"""The jinja2 chat template and tokenization equal transformers'; streaming never splits UTF-8."""

from __future__ import annotations

import json

import pytest

from edgevlm.errors import UserError
from edgevlm.runtime.chat import (
    ChatTemplate,
    StreamDecoder,
    Tokenizer,
    expand_image_tokens,
    special_tokens_from_config,
)

MESSAGES = [
    [{"role": "user", "content": "<image>\nWhat color is the circle?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
    [{"role": "user", "content": "<image>\nIs there a square?"},
     {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "Where is it? ünïcødé 🐍 日本語"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": [{"type": "text", "text": "left of?"},
                                  {"type": "image", "image": object()}]},
     {"role": "assistant", "content": None, "reasoning": "think"}],
]

# A template in the style of real checkpoints: default system prompt, namespace, loop
# controls, tojson, raise_exception, the special-token variables and a generation block.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not defined %}{{ message['reasoning_content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% continue %}{% endif %}"
    "{{ part | tojson }}{% endfor %}{% endif %}"
    "{% generation %}{{ eos_token }}{% endgeneration %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{# {{ ns.n }} turns #}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return out


def _template(tok_dir, source=None):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    source = source or (tok_dir / "chat_template.jinja").read_text()
    return ChatTemplate(source, special_tokens_from_config({**cfg, "bos_token": "<s>"}))


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_apply_chat_template(tokenizer, tok_dir, generation_prompt):
    ours = _template(tok_dir)
    for msgs in MESSAGES:
        expected = tokenizer.apply_chat_template(msgs, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert ours.render(msgs, add_generation_prompt=generation_prompt) == expected


def test_rich_template_equals_apply_chat_template(tokenizer, tok_dir):
    ours = _template(tok_dir, RICH_TEMPLATE)
    for msgs in MESSAGES:
        expected = tokenizer.apply_chat_template(msgs, chat_template=RICH_TEMPLATE,
                                                 tokenize=False, add_generation_prompt=True,
                                                 bos_token="<s>")
        assert ours.render(msgs) == expected
    with pytest.raises(UserError, match="bad role"):
        ours.render([{"role": "tool", "content": "x"}])


def test_tokenize_and_expand_equal_transformers(tokenizer, tok_dir):
    ours, tok = _template(tok_dir), Tokenizer(tok_dir / "tokenizer.json")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for msgs in MESSAGES:
        text = ours.render(msgs)
        assert tok.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
        expanded = text.replace("<image>", "<image>" * 9)
        assert (expand_image_tokens(tok.encode(text), image_id, 9)
                == tokenizer(expanded, add_special_tokens=False)["input_ids"])


def test_stream_decoder_never_splits_characters(tok_dir):
    tok = Tokenizer(tok_dir / "tokenizer.json")
    text = "héllo wörld 🐍🐍 日本語 ok<|im_end|> x 👍🏽"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text must split characters"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert "<|im_end|>" not in "".join(pieces)  # special tokens are skipped


def test_bad_template_and_messages(tok_dir):
    with pytest.raises(UserError, match="chat template"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(UserError, match="no chat template"):
        ChatTemplate("")
    with pytest.raises(UserError, match="empty"):
        _template(tok_dir).render([])
    with pytest.raises(UserError, match="role"):
        _template(tok_dir).render([{"content": "hi"}])
