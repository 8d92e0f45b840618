"""`edgevlm serve` as a user runs it: a process on loopback that answers, finishes a request in
flight when sent SIGTERM and then exits; and the server's modules never import torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx2

from tests.serve.conftest import png_url, wait_healthy

LEAN = """
import sys
from edgevlm.runtime import VLM
from edgevlm.serve import ServeConfig, create_app
import edgevlm.cli.serve
create_app(lambda: VLM.load(sys.argv[1], provider="cpu"), ServeConfig())
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, heavy
"""


def test_the_server_never_imports_torch(serve_export):
    run = subprocess.run([sys.executable, "-c", LEAN, str(serve_export)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_request_in_flight_then_exits(serve_export):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm.cli", "serve", str(serve_export),
                             "--port", str(port), "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60, proc)
        model = httpx2.get(url + "/v1/models").json()["data"][0]["id"]
        assert model == serve_export.name
        ask = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url(9)}}]}]}
        cached = [httpx2.post(url + "/v1/chat/completions", json=ask, timeout=60).json()[
            "timings"]["image_cached"] for _ in range(2)]
        assert cached == [False, True]  # --image-cache-mb (256 by default) reached the VLM
        body = {"model": model, "max_tokens": 200, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_url(0)}},
                    {"type": "text", "text": "Describe it."}]}]}
        with httpx2.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
        # uvicorn, once shut down gracefully, re-raises the signal it caught, as a process
        # ended by SIGTERM reports it; it exits by itself within the minute either way
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
