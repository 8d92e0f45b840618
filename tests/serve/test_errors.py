"""Each refusal the server makes: OpenAI's error object with the right status and one message
that names the field or flag, and the server goes on serving after it."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
import time

import pytest
from starlette.testclient import TestClient

from tests.serve.conftest import MODEL_ID, png_url

CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def client_for(load, **cfg):
    from edgevlm.serve import ServeConfig, create_app

    with TestClient(create_app(load, ServeConfig(model_id=MODEL_ID, **cfg))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "in.png").write_bytes(base64.b64decode(png_url(0).split(",", 1)[1]))
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes((root / "in.png").read_bytes())
    os.symlink(outside, root / "link.png")
    return root


@pytest.fixture(scope="module")
def client(served_vlm, media):
    with client_for(lambda: served_vlm, media_path=media, max_body_bytes=200_000,
                    max_image_pixels=64 * 64, max_messages=4, max_prompt_tokens=60) as c:
        yield c


def _image(url: str, text: str = "What is it?") -> dict:
    return {"model": MODEL_ID, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": text}]}]}


def _refused(client, status: int, *words: str, body=None, **kwargs) -> dict:
    r = client.post(CHAT, json=body, **kwargs) if body is not None else client.post(CHAT,
                                                                                   **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    for word in words:
        assert word in error["message"], error["message"]
    ok = client.post(CHAT, json=_image(png_url(1)))  # and the server goes on serving
    assert ok.status_code == 200, ok.text
    return error


def test_an_image_by_path_under_media_path_is_read(client):
    assert client.post(CHAT, json=_image("in.png")).status_code == 200


@pytest.mark.parametrize("url, words", [
    ("https://example.com/cat.png", ["never fetches", "data:image/png;base64"]),
    ("data:image/png;base64,%%%notbase64", ["base64"]),
    ("data:text/plain;base64,aGVsbG8=", ["image/"]),
    ("data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), ["not an image"]),
    ("../outside/secret.png", ["outside --media-path"]),
    ("link.png", ["outside --media-path", "symlinks resolved"]),
    ("/etc/passwd", ["outside --media-path"]),
    ("missing.png", ["not a file"]),
])
def test_bad_images_are_400(client, url, words):
    _refused(client, 400, *words, body=_image(url))


def test_local_paths_without_media_path_are_refused(served_vlm):
    with client_for(lambda: served_vlm) as c:
        _refused(c, 400, "--media-path", body=_image("in.png"))


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, ["type 'audio'"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, ["role 'tool'"]),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, ["n=2", "not supported"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, ["temperature"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, ["top_p"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, ["stop"]),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, ["unknown field"]),
    ({"messages": [{"role": "user", "content": "hi"}] * 5}, ["--max-messages 4"]),
    ({"messages": [{"role": "user", "content": "shape " * 80}]}, ["--max-prompt-tokens 60"]),
])
def test_bad_requests_are_400(client, body, words):
    _refused(client, 400, *words, body=body)


def test_two_images_for_a_one_image_model_are_400(client):
    body = _image(png_url(2))
    body["messages"][0]["content"].insert(0, body["messages"][0]["content"][0])
    _refused(client, 400, "2 images", "one image", body=body)


@pytest.mark.parametrize("raw", [b'{"messages": [', b'{"seed": ' + b"9" * 5000 + b"}",
                                 b'{"a": "\xff"}', b"[" * 100_000])
def test_malformed_json_is_400(client, raw):
    _refused(client, 400, "not valid JSON", content=raw, headers={
        "content-type": "application/json"})


def test_too_large_is_413_naming_the_flag(client):
    _refused(client, 413, "--max-body-bytes", content=b"x" * 200_001)
    _refused(client, 413, "--max-image-pixels", body=_image(png_url(3, size=65)))


def test_unknown_model_and_route_are_404(client):
    body = {**_image(png_url(1)), "model": "gpt-4o"}
    assert _refused(client, 404, "'gpt-4o'", body=body)["code"] == "model_not_found"
    assert client.get("/v1/nothing").json()["error"]["message"].startswith("no route")


def test_the_api_key_guards_every_route_but_health(served_vlm):
    with client_for(lambda: served_vlm, api_key="s3cret") as c:
        for path in ("/v1/models", "/metrics"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post(CHAT, json=_image(png_url(1)),
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post(CHAT, json=_image(png_url(1)), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200


def test_503_while_loading(served_vlm):
    from edgevlm.serve import ServeConfig, create_app

    go = threading.Event()

    def slow_load():
        go.wait(30)
        return served_vlm

    with TestClient(create_app(slow_load, ServeConfig(model_id=MODEL_ID))) as c:
        assert c.get("/health").status_code == 503
        r = c.post(CHAT, json=_image(png_url(1)))
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        go.set()
        for _ in range(300):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        assert c.post(CHAT, json=_image(png_url(1))).status_code == 200


def test_metrics_count_requests_and_tokens(client):
    client.post(CHAT, json=_image(png_url(1)))
    text = client.get("/metrics").text
    assert 'edgevlm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "edgevlm_ttft_seconds_bucket" in text and "edgevlm_queue_depth 0" in text
    assert float(re.search(r"^edgevlm_completion_tokens_total (\S+)$", text, re.M)[1]) > 0
