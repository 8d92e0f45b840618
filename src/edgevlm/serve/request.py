"""A `POST /v1/chat/completions` body, checked and turned into what `VLM.stream` takes.

OpenAI's request shape (https://platform.openai.com/docs/api-reference/chat/create): messages
whose content is a string or typed parts (`text`, `image_url`), and the sampling fields the
runtime implements (max_tokens / max_completion_tokens, temperature, top_p, seed, stop, n=1).
A field the runtime cannot honour is refused with a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from edgevlm.serve.api_error import APIError, bad_request
from edgevlm.serve.media import load_image_url

# Accepted and without effect on the answer (bookkeeping fields clients send)
IGNORED = {"user", "metadata", "store", "service_tier"}
# Accepted at these values only: anything else asks for what the runtime does not do
DEFAULTS_ONLY = {"n": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
                 "logprobs": (False, None), "top_logprobs": (None, 0), "logit_bias": (None,),
                 "tools": (None,), "tool_choice": (None, "none"), "functions": (None,),
                 "function_call": (None, "none"), "parallel_tool_calls": (None,),
                 "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
                 "audio": (None,), "prediction": (None,), "reasoning_effort": (None,)}
USED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "seed", "stop", "stream", "stream_options"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # OpenAI's limit on `stop`


@dataclass(frozen=True)
class ModelFacts:
    """What parsing needs to know of the loaded export."""

    model_id: str
    image_tag: str  # the token the template writes for an image
    takes_parts: bool  # the template renders [{"type": "image"}, {"type": "text"}] content


@dataclass(frozen=True)
class Limits:
    media_path: Path | None
    max_image_pixels: int
    max_messages: int


@dataclass(frozen=True)
class ChatRequest:
    """One parsed request: runtime chat messages, the image (at most one), the generation
    arguments of VLM.stream, and how to answer."""

    messages: list[dict]
    image: Image.Image | None
    max_new_tokens: int | None  # None: up to the export's context
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a 5000-digit int
        raise bad_request(f"the request body is not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat(body: dict, facts: ModelFacts, limits: Limits) -> ChatRequest:
    """The request, or APIError saying what to change."""
    _check_fields(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {json.dumps(model)[:40]}", "model")
    if model is not None and model != facts.model_id:
        raise APIError(404, f"model {model!r} is not served here; this server serves "
                       f"{facts.model_id!r} (GET /v1/models)", "model", "model_not_found")
    messages, image = _messages(body.get("messages"), facts, limits)
    options = body.get("stream_options")
    stream = _typed(body, "stream", bool, False)
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad_request("stream_options must be an object, and only with stream: true",
                          "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.")
    return ChatRequest(messages, image, _max_tokens(body), _number(body, "temperature", 1.0, 0, 2),
                       _number(body, "top_p", 1.0, 0, 1, low_open=True), _seed(body),
                       _stop(body.get("stop")), stream, include_usage)


def _check_fields(body: dict) -> None:
    for key, value in body.items():
        if key in USED or key in IGNORED:
            continue
        if key in DEFAULTS_ONLY:
            if any(_is_default(value, ok) for ok in DEFAULTS_ONLY[key]):
                continue
            raise bad_request(f"{key}={json.dumps(value)[:80]} is not supported by this server "
                              f"(it generates one answer, with temperature, top_p, seed and "
                              f"stop); leave {key} out", key)
        raise bad_request(f"unknown field {key[:80]!r}; this server takes "
                          f"{', '.join(sorted(USED))}", key[:80])


def _is_default(value, ok) -> bool:
    if ok is None or isinstance(ok, bool):
        return value is ok
    if isinstance(ok, int):  # 0 and 0.0 alike, never False
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value == ok
    return value == ok


def _messages(messages, facts: ModelFacts, limits: Limits) -> tuple[list[dict], object]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects",
                          "messages")
    if len(messages) > limits.max_messages:
        raise bad_request(f"{len(messages)} messages are over --max-messages "
                          f"{limits.max_messages}", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string role", "messages")
        role = ROLES.get(m["role"])
        if role is None:
            raise bad_request(f"messages[{i}].role {m['role'][:40]!r} is not supported; use "
                              "system, developer, user or assistant", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad_request(f"messages[{i}] has unsupported fields {sorted(extra)[:5]} "
                              "(tool calls are not supported)", "messages")
        content = _content(m.get("content"), i, role, facts, limits, images)
        out.append({"role": role, "content": content})
    if len(images) > 1:
        raise bad_request(f"the messages hold {len(images)} images; this model takes one image "
                          "per request: send one, or ask about each in its own request",
                          "messages")
    return out, (images[0] if images else None)


def _content(content, i: int, role: str, facts: ModelFacts, limits: Limits, images: list):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content must be a string or a list of parts",
                          "messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(load_image_url(url, limits.media_path, limits.max_image_pixels))
            parts.append({"type": "image"})
        else:
            raise bad_request(f"messages[{i}].content[{j}] is not a text part "
                              '({"type": "text", "text": "..."})'
                              + (" or an image_url part" if role == "user" else "")
                              + f"; got type {str(kind)[:40]!r}", "messages")
    if facts.takes_parts:
        return parts
    # a text-only template: the image tag on a line of its own, LLaVA's convention
    return "".join(facts.image_tag + "\n" if p["type"] == "image" else p["text"] for p in parts)


def _typed(body: dict, key: str, kind: type, default, prefix: str = ""):
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not kind:
        raise bad_request(f"{prefix}{key} must be {kind.__name__}, got "
                          f"{json.dumps(value)[:40]}", prefix + key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"{key} must be a number in {bound}, got {json.dumps(value)[:40]}", key)
    return float(value)


def _max_tokens(body: dict) -> int | None:
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    if not given:
        return None
    value = body[given[0]]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"{given[0]} must be an integer of at least 1, got "
                          f"{json.dumps(value)[:40]}", given[0])
    return value


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise bad_request(f"seed must be an integer from 0 to {2**32 - 1}, got "
                          f"{json.dumps(seed)[:40]}", "seed")
    return seed


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            any(not isinstance(s, str) or not s for s in stops):
        raise bad_request(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of "
                          "them", "stop")
    return tuple(stops)
