"""Prompts without transformers: the chat template in jinja2, tokenization, streaming decode.

`ChatTemplate.render` reproduces `PreTrainedTokenizer.apply_chat_template(..., tokenize=False)`
of transformers 5: the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks, the
loopcontrols extension, its `tojson`, `raise_exception`, `strftime_now` helpers), messages reduced
to plain JSON data with None-valued keys dropped, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) visible to the template. `Tokenizer` wraps the `tokenizers`
library on tokenizer.json. `StreamDecoder` turns token ids into text pieces the way text-generation
servers do: a piece is released only once it no longer ends in an incomplete UTF-8 sequence, so
a multi-byte character split across tokens never reaches the user half-written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from tokenizers import Tokenizer as _HFTokenizer

from edgevlm.errors import UserError
from edgevlm.runtime.sandbox import BoundedEnvironment, TemplateLimitError, budget

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
REPLACEMENT = "\ufffd"  # what a byte-level decoder emits for an incomplete UTF-8 sequence


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (training templates mark assistant text
    with it); transformers uses it to find assistant tokens, rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Plain JSON data for the template; other objects (an image in a content part) become an
    inert "<TypeName>" placeholder, as transformers does, since templates only test for keys."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) reduced to the base type
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise UserError("the export has no chat template; re-export a model whose tokenizer "
                            "has one (chat_template.jinja or tokenizer_config.json)")
        # transformers' sandbox, bounded in steps, time and sizes, one template (runtime.sandbox)
        env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.add_filter("tojson", _tojson)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except (jinja2.TemplateSyntaxError, RecursionError) as e:
            reason = "it nests too deeply" if isinstance(e, RecursionError) else e
            raise UserError(f"the chat template does not parse ({reason}); fix "
                            "chat_template.jinja in the export") from e
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text, as `apply_chat_template(messages, tokenize=False, ...)` gives it."""
        if not messages:
            raise UserError("messages is empty; give at least one {'role', 'content'} message")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise UserError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
            if reasoning is not None:  # older names aliased as transformers does
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(_plain(m))
        try:
            with budget():
                return self._template.render(
                    messages=chat, tools=None, documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **_plain({**self.special_tokens, **kwargs}))
        except TemplateLimitError as e:
            raise UserError(f"the chat template went past the sandbox's bounds: {e}; fix "
                            "chat_template.jinja in the export") from e
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template rejected these messages: {e}") from e
        except (RecursionError, ArithmeticError) as e:  # a macro calling itself, 1/0, ...
            raise UserError(f"the chat template fails ({type(e).__name__}: {e}); fix "
                            "chat_template.jinja in the export") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # a template written for other message shapes, e.g. `'...' + message['content']`
            # on a list of content parts
            raise UserError(f"the chat template cannot render these messages "
                            f"({type(e).__name__}: {e}); give the content as a string") from e

    def takes_parts(self, image_tag: str) -> bool:
        """Whether the template renders a user message given as typed parts, [{"type":
        "image"}, {"type": "text", ...}], with the image where `image_tag` marks it. Templates
        written for text-only models concatenate `message['content']` as a string and fail or
        print the list; LLaVA's, SmolVLM's and Qwen2-VL's take parts."""
        probe = "\u2063probe"  # an invisible separator no template writes itself
        try:
            text = self.render([{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": probe}]}])
        except UserError:
            return False
        return probe in text and image_tag in text and "'type'" not in text


def call_messages(prompt: str | Sequence[dict], with_image: bool, tag: str,
                  takes_parts: bool) -> list[dict]:
    """Chat messages for one call. A plain question without the image `tag` gets the image
    before it: as the template's image part when the template takes typed parts
    (`ChatTemplate.takes_parts`), else as the tag on a line of its own in the text (LLaVA's
    convention, which a text-only template such as SmolLM2's passes through); explicit messages
    are used as given."""
    if isinstance(prompt, str):
        if with_image and tag not in prompt:
            if takes_parts:
                return [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": prompt}]}]
            return [{"role": "user", "content": f"{tag}\n{prompt}"}]
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise UserError(f"prompt must be a string or a list of chat messages, got "
                    f"{type(prompt).__name__}")


def alias_image_tag(prompt, alias: str, tag: str):
    """`prompt` (a string or chat messages) with `alias` written as `tag` in its text."""
    if isinstance(prompt, str):
        return prompt.replace(alias, tag)
    if not (isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt)):
        return prompt  # call_messages names the type
    out = []
    for m in prompt:
        content = m.get("content")
        if isinstance(content, str):
            content = content.replace(alias, tag)
        elif isinstance(content, list):
            content = [{**c, "text": c["text"].replace(alias, tag)}
                       if isinstance(c, dict) and isinstance(c.get("text"), str) else c
                       for c in content]
        out.append({**m, "content": content})
    return out


def special_tokens_from_config(tokenizer_config: dict) -> dict[str, str]:
    """{bos_token: "...", eos_token: "...", ...} from tokenizer_config.json, as the template sees
    them (transformers passes its special_tokens_map)."""
    out = {}
    for key, value in tokenizer_config.items():
        if not key.endswith("_token"):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


class Tokenizer:
    """tokenizer.json through the `tokenizers` library (what transformers' fast tokenizer runs)."""

    def __init__(self, path: str | Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise UserError(f"cannot read tokenizer {path} ({e}); re-export the model so the "
                            "export holds its tokenizer.json") from e
        self.path = Path(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of already-templated text (no BOS/EOS added: the template wrote them)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def expand_image_tokens(ids: list[int], image_token_id: int, count: int) -> list[int]:
    """Each image token repeated `count` times, one per image feature (LlavaProcessor does this
    on the text; on ids it is the same, since an added token always encodes alone)."""
    out = []
    for t in ids:
        out.extend([t] * count if t == image_token_id else [t])
    return out


class StreamDecoder:
    """Incremental detokenization: `push(token_id)` returns the newly completed text.

    Decodes a short window of recent tokens rather than the whole answer each step, and holds a
    piece back while it ends in U+FFFD (a character whose bytes have not all arrived yet).
    Concatenating every piece plus `flush()` gives the decode of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding from here gives context for spacing rules
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix: self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix: self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]
