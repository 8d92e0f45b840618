"""`POST /v1/chat/completions`: read and check the request, run it on the engine, and answer
as OpenAI does — one `chat.completion` object, or with `stream: true` server-sent events of
`chat.completion.chunk` objects ending in `data: [DONE]` (a usage chunk before it when
`stream_options.include_usage`). Every reply carries `usage` and this server's `timings`."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgevlm.errors import UserError
from edgevlm.serve.api_error import APIError
from edgevlm.serve.engine import Engine, Run
from edgevlm.serve.request import ChatRequest, Limits, ModelFacts, parse_chat, parse_json

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, over --max-body-bytes "
                       f"{limit}", None, "request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body is over --max-body-bytes {limit} bytes",
                           None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e))
    return APIError(500, f"internal error ({type(e).__name__}: {e}); the server goes on serving")


async def chat_completions(request: Request, engine: Engine, facts: ModelFacts,
                           limits: Limits, max_body: int) -> Response:
    t_arrival = time.perf_counter()
    body = parse_json(await read_body(request, max_body))
    req = await run_in_threadpool(parse_chat, body, facts, limits)  # decodes the image
    run = await engine.start(req, t_arrival)
    kind, value = await run.next()
    if kind == "error":
        raise as_api_error(value)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": facts.model_id}
    if req.stream:
        return EventStream(_events(run, req, head), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
    return await _collect(request, run, head)


async def _watch_disconnect(request: Request, run: Run) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel.set()
            return


async def _collect(request: Request, run: Run, head: dict) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    pieces = []
    try:
        while True:
            kind, value = await run.next()
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                raise as_api_error(value)
            else:
                break
    finally:
        watcher.cancel()
    if value is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    message = {"role": "assistant", "content": value.text}
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": FINISH[value.finish_reason]}],
                         "usage": usage(value), "timings": timings(value, run)})


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a client gone mid-stream
    (however the server reports it) sets the cancel flag at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(run: Run, req: ChatRequest, head: dict):
    def chunk(delta: dict, finish: str | None = None) -> str:
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish}]}
        return _sse({**out, "usage": None} if req.include_usage else out)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await run.next()
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "error":  # after the 200: OpenAI's error object as an event
                yield _sse(as_api_error(value).body())
                break
            else:
                if value is not None:
                    yield chunk({}, FINISH[value.finish_reason])
                    if req.include_usage:
                        yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                    "usage": usage(value), "timings": timings(value, run)})
                break
        yield "data: [DONE]\n\n"
    finally:
        run.cancel.set()  # a no-op once generation ended; stops it when the client left


def usage(result) -> dict:
    t = result.timings
    return {"prompt_tokens": t.n_prompt_tokens, "completion_tokens": t.n_new_tokens,
            "total_tokens": t.n_prompt_tokens + t.n_new_tokens}


def timings(result, run: Run) -> dict:
    """This server's own figures (not OpenAI's): milliseconds, and the decode rate."""
    t = result.timings

    def ms(s: float) -> float:
        return round(s * 1000, 3)

    rate = t.decode_tokens_per_s
    return {"queue_ms": ms(run.queue_s), "preprocess_ms": ms(t.preprocess_s),
            "vision_ms": ms(t.vision_s), "prefill_ms": ms(t.prefill_s), "ttft_ms": ms(t.ttft_s),
            "decode_ms": ms(t.decode_s), "total_ms": ms(t.total_s),
            "decode_tokens_per_s": None if math.isnan(rate) else round(rate, 3),
            "image_cached": t.image_cached}
