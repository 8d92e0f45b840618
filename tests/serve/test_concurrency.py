"""--parallel: 8 clients x 25 requests at once get exactly the answers one client gets alone;
--max-queue bounds the wait (429); a client that goes away stops its generation."""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2

from tests.serve.conftest import MODEL_ID, image_of, live_server, png_url

CLIENTS, REQUESTS = 8, 25


def _body(i: int, url: str, max_tokens: int = 8, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": f"Question {i % 5}: what shape is it?"}]
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def test_concurrent_clients_get_the_serial_answers(server, served_vlm):
    urls = [png_url(10 + k) for k in range(4)]
    jobs = [(c, r) for c in range(CLIENTS) for r in range(REQUESTS)]

    def want(c: int, r: int) -> str:
        i = c * REQUESTS + r
        return served_vlm.generate(image_of(urls[i % 4]), _body(i, urls[0])["messages"][0][
            "content"][1]["text"], max_new_tokens=8).text

    serial = {(c, r): want(c, r) for c, r in jobs}

    def client(c: int) -> list[tuple[tuple[int, int], str]]:
        out = []
        with httpx2.Client(base_url=server, timeout=60) as http:
            for r in range(REQUESTS):
                i = c * REQUESTS + r
                reply = http.post("/v1/chat/completions", json=_body(i, urls[i % 4]))
                assert reply.status_code == 200, reply.text
                out.append(((c, r), reply.json()["choices"][0]["message"]["content"]))
        return out

    with ThreadPoolExecutor(CLIENTS) as pool:
        got = dict(pair for part in pool.map(client, range(CLIENTS)) for pair in part)
    assert got == serial
    assert len(set(serial.values())) > 1  # the answers differ, so a mix-up would show


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_a_full_queue_is_429(served_vlm):
    """One slot, no queue: of requests sent at once, the ones that find the slot taken get 429
    (OpenAI's error object) and the server goes on serving."""
    with live_server(lambda: served_vlm, parallel=1, max_queue=0) as url:
        statuses, errors = [], []
        for _ in range(5):  # bursts until one overlaps (the micro model answers in ~50 ms)
            start = threading.Barrier(6)

            def one(i: int, start=start):
                start.wait()
                r = httpx2.post(url + "/v1/chat/completions", timeout=60,
                                json=_body(i, png_url(i), max_tokens=200))
                statuses.append(r.status_code)
                if r.status_code == 429:
                    errors.append(r.json()["error"])

            with ThreadPoolExecutor(6) as pool:
                list(pool.map(one, range(6)))
            if errors:
                break
        assert set(statuses) <= {200, 429} and 200 in statuses and errors, statuses
        assert "--max-queue" in errors[0]["message"] and errors[0]["type"] == "rate_limit_error"
        assert httpx2.post(url + "/v1/chat/completions", json=_body(0, png_url(0)),
                           timeout=60).status_code == 200


def test_the_queue_check_is_exact(served_vlm):
    """At the engine: with its one slot taken and --max-queue 0, the next request is refused
    at once; with --max-queue 1 it waits and runs."""
    from edgevlm.serve.api_error import APIError
    from edgevlm.serve.engine import Engine
    from edgevlm.serve.metrics import Metrics
    from edgevlm.serve.request import ChatRequest

    req = ChatRequest([{"role": "user", "content": "hi"}], None, 4, 0.0, 1.0, None, (), False,
                      False)

    async def drain(run):
        while (event := await run.next())[0] not in ("done", "error"):
            pass
        return event

    async def main(max_queue: int):
        engine = Engine(served_vlm, 1, max_queue, None, Metrics())
        first = await engine.start(req, 0.0)
        try:
            second = await engine.start(req, 0.0)
        except APIError as e:
            await drain(first)
            return e.status
        kinds = [(await drain(first))[0], (await drain(second))[0]]
        engine.close()
        return kinds

    assert asyncio.run(main(0)) == 429
    assert asyncio.run(main(1)) == ["done", "done"]


def test_a_cancelled_generation_stops_and_frees_its_slot(served_vlm):
    from edgevlm.serve.engine import Engine
    from edgevlm.serve.metrics import Metrics
    from edgevlm.serve.request import ChatRequest

    req = ChatRequest([{"role": "user", "content": "<image>\nDescribe it."}],
                      image_of(png_url(1)), 200,
                      0.0, 1.0, None, (), True, False)

    async def main():
        engine = Engine(served_vlm, 1, 0, None, Metrics())
        gone = threading.Event()
        gone.set()  # as the stream's generator sets it when the client goes away
        run = await engine.start(req, 0.0, gone)
        pieces = 0
        while (event := await run.next())[0] not in ("done", "error"):
            pieces += event[0] == "piece"
        await run.done
        await asyncio.sleep(0)  # the slot is given back by the future's done callback
        return event[1], pieces, engine.in_flight, engine.metrics.cancelled

    result, pieces, in_flight, cancelled = asyncio.run(main())
    assert result is None and pieces <= 2 and in_flight == 0 and cancelled == 1


def test_a_client_gone_mid_stream_frees_its_slot(served_vlm):
    with live_server(lambda: served_vlm, parallel=1, max_queue=0) as url:
        with httpx2.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions",
                             json=_body(0, png_url(0), max_tokens=200, stream=True)) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first event, then hang up
        for _ in range(100):
            metrics = httpx2.get(url + "/metrics").text
            if _metric(metrics, "edgevlm_requests_in_flight") == 0:
                break
            threading.Event().wait(0.05)
        assert _metric(metrics, "edgevlm_requests_in_flight") == 0
        reply = httpx2.post(url + "/v1/chat/completions", json=_body(1, png_url(1)), timeout=60)
        assert reply.status_code == 200  # the one slot is free again
