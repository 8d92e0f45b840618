"""A byte-level BPE tokenizer trained on a data set's own text, with a ChatML chat template.

Byte-level means every string encodes (unknown characters fall back to bytes), so a model made
with it answers any prompt; ChatML (`<|im_start|>role ... <|im_end|>`) is the template Qwen2 and
the llava-interleave checkpoints use, so our tiny models and real ones render prompts alike.
The runtime renders this same template with jinja2 (edgevlm.runtime.chat).
"""

from __future__ import annotations

from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN]

# Content may be a string (LLaVA data: "<image>\nWhat ...") or a list of typed parts
# (transformers' multimodal messages: [{"type": "image"}, {"type": "text", "text": ...}]).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Put before a text-only template (one that concatenates message['content'] as a string, as
# SmolLM2's and most language models' do): a message whose content is a list of typed parts
# becomes one string, the image tag on its own line where the image part stood, so the same
# template renders both LLaVA data ("<image>\nWhat ...") and transformers' multimodal messages.
PARTS_TO_TEXT = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.messages = ns.messages + [message] -%}"
    "{%- else -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '" + IMAGE_TOKEN
    + "\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def with_image_parts(template: str, special_tokens: dict[str, str] | None = None) -> str:
    """`template`, or, when it cannot render a message of typed parts with the image in it,
    the same template behind PARTS_TO_TEXT."""
    from edgevlm.runtime.chat import ChatTemplate

    if ChatTemplate(template, special_tokens).takes_parts(IMAGE_TOKEN):
        return template
    wrapped = PARTS_TO_TEXT + template
    assert ChatTemplate(wrapped, special_tokens).takes_parts(IMAGE_TOKEN), \
        "the wrapped template still does not take image parts"
    return wrapped


def _with_roles(texts: Iterable[str]):
    """The texts, each followed by the template's role names: every rendered conversation
    carries them, so they should merge into single tokens like any frequent word (otherwise
    "assistant" costs 7 tokens of every training sequence)."""
    for text in texts:
        yield text
        yield "user\nassistant\n"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on `texts`; returns a transformers fast tokenizer.

    The special tokens come first (ids 0..3) so every model made from any data agrees on them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is below the 256 byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_roles(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
