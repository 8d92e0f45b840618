"""Serve fixtures: the runtime tests' micro LLaVA export (random weights drawn wide, so greedy
answers differ from image to image), loaded once, and a live uvicorn server on a free loopback
port in a thread of the test process."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import numpy as np
import pytest

from tests.runtime.conftest import _model_and_export

MODEL_ID = "micro"


@pytest.fixture(scope="session")
def serve_export(tmp_path_factory, tokenizer):
    return _model_and_export(tmp_path_factory, tokenizer, "siglip")[1]


@pytest.fixture(scope="session")
def served_vlm(serve_export):
    from edgevlm.runtime import VLM

    return VLM.load(serve_export, provider="cpu", threads=1)


def png_url(seed: int, size: int = 48) -> str:
    """A random RGB image as a data:image/png;base64 URL."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_of(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def wait_healthy(url: str, seconds: float, proc=None) -> None:
    """Until the server at `url` answers /health with 200 (its process, if given, alive)."""
    import httpx2

    deadline = time.monotonic() + seconds
    while True:
        assert proc is None or proc.poll() is None, proc.communicate()
        try:
            if httpx2.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        assert time.monotonic() < deadline, f"no /health 200 in {seconds} s"
        time.sleep(0.05)


@contextlib.contextmanager
def live_server(load, **cfg):
    """uvicorn serving create_app(load, ServeConfig(**cfg)) on 127.0.0.1:<free port>; yields the
    base URL once /health answers 200."""
    import uvicorn

    from edgevlm.serve import ServeConfig, create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(load, ServeConfig(model_id=MODEL_ID, port=port, **cfg))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 30)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(served_vlm):
    with live_server(lambda: served_vlm, parallel=4) as url:
        yield url
