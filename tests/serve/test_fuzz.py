"""Random request bodies thrown at the app in-process get only 2xx/4xx JSON answers: never a
500, never a hang (hypothesis, bounded examples and time)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import MODEL_ID, png_url

SMALL_PNG = png_url(0, size=16)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                    st.text(max_size=12))
urls = st.one_of(st.just(SMALL_PNG), st.just("data:image/png;base64,AAAA"),
                 st.just("http://127.0.0.1/x.png"), st.just("../../etc/passwd"),
                 st.text(max_size=20))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": urls})}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), scalars, max_size=3))
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
     "content": st.one_of(st.text(max_size=40), st.lists(parts, max_size=3), scalars)}),
    max_size=4)
fields = {"model": st.one_of(st.just(MODEL_ID), scalars), "messages": messages,
          "max_tokens": st.one_of(st.integers(-1, 6), scalars),
          "temperature": scalars, "top_p": scalars, "seed": scalars,
          "stop": st.one_of(scalars, st.lists(st.text(max_size=3), max_size=5)),
          "stream": st.one_of(st.booleans(), scalars), "n": scalars,
          "stream_options": st.one_of(scalars, st.fixed_dictionaries(
              {"include_usage": scalars}))}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=fields).map(json.dumps),
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3)).map(json.dumps),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")))


@pytest.fixture(scope="module")
def client(served_vlm):
    from tests.serve.test_errors import client_for

    with client_for(lambda: served_vlm) as c:
        yield c


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies)
def test_random_bodies_get_only_2xx_or_4xx_json(client, body):
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", content=body.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"})
    assert time.perf_counter() - t < 10, "a request hung"
    assert 200 <= r.status_code < 500, (r.status_code, r.text, body)
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        reply = r.json()
        assert ("choices" in reply) if r.status_code == 200 else ("error" in reply), reply
