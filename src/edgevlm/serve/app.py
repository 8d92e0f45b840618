"""The Starlette app of `edgevlm serve`: the routes, the API key check, and loading the export
in the background so `/health` answers 503 until it is ready.

Routes: POST /v1/chat/completions (edgevlm.serve.completions), GET /v1/models (the export,
with its family and precision), GET /health, GET /metrics (Prometheus text). With an API key,
every route but /health needs `Authorization: Bearer KEY`. Every error is OpenAI's error
object (edgevlm.serve.api_error).
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgevlm.serve.api_error import APIError
from edgevlm.serve.completions import chat_completions
from edgevlm.serve.config import ServeConfig
from edgevlm.serve.engine import Engine
from edgevlm.serve.metrics import Metrics
from edgevlm.serve.request import Limits, ModelFacts


class ServerState:
    """The loaded model (None while loading) and what the routes share."""

    def __init__(self, load: Callable[[], object], cfg: ServeConfig):
        self.load = load
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.facts: ModelFacts | None = None
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None
        self.loaded_at = 0
        self.limits = Limits(cfg.media_path, cfg.max_image_pixels, cfg.max_messages)

    def load_now(self) -> None:
        """Load the export (on a thread of its own: the server answers meanwhile)."""
        try:
            vlm = self.load()
            engine = Engine(vlm, self.cfg.parallel, self.cfg.max_queue,
                            self.cfg.max_prompt_tokens, self.metrics, self.cfg.batching)
        except BaseException as e:  # noqa: BLE001  reported by /health and by `serve`
            self.load_error = e
            if self.on_load_error is not None:
                self.on_load_error(e)
            return
        tag = vlm.image_tag or "<image>"
        self.facts = ModelFacts(self.cfg.model_id, tag, vlm.template.takes_parts(tag))
        self.loaded_at = int(time.time())
        self.engine = engine

    def ready(self) -> Engine:
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the export failed to load: {self.load_error}")
            raise APIError(503, "the model is loading; retry in a moment", None, "loading")
        return self.engine

    def check_key(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "missing or wrong API key; send the header `Authorization: "
                           "Bearer KEY` with the key the server was started with (--api-key)",
                           None, "invalid_api_key")


def _route(state: ServerState, name: str, handler, guarded: bool = True):
    """The handler with the key check, OpenAI errors and the request counter around it."""

    async def endpoint(request: Request) -> Response:
        try:
            if guarded:
                state.check_key(request)
            response = await handler(request)
        except APIError as e:
            response = e.response()
        state.metrics.request(name, response.status_code)
        return response

    return endpoint


def create_app(load: Callable[[], object], cfg: ServeConfig) -> Starlette:
    """The app; `load()` returns the VLM and runs on a background thread at startup."""
    state = ServerState(load, cfg)

    async def health(request: Request) -> Response:
        state.ready()
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    async def model(request: Request) -> Response:
        card = _model_card(state)
        if request.path_params["model"] != card["id"]:
            raise APIError(404, f"model {request.path_params['model']!r} is not served here; "
                           f"this server serves {card['id']!r}", "model", "model_not_found")
        return JSONResponse(card)

    async def metrics(request: Request) -> Response:
        engine = state.engine
        text = state.metrics.render(engine.in_flight if engine else 0,
                                    engine.waiting if engine else 0, engine is not None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(request: Request) -> Response:
        engine = state.ready()
        return await chat_completions(request, engine, state.facts, state.limits,
                                      cfg.max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load_now, name="edgevlm-load", daemon=True).start()
        yield
        if state.engine is not None:  # uvicorn has let the requests in flight finish
            state.engine.close()

    routes = [Route("/health", _route(state, "/health", health, guarded=False)),
              Route("/v1/models", _route(state, "/v1/models", models)),
              Route("/v1/models/{model:path}", _route(state, "/v1/models/{model}", model)),
              Route("/metrics", _route(state, "/metrics", metrics)),
              Route("/v1/chat/completions", _route(state, "/v1/chat/completions", chat),
                    methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.serve = state
    return app


def _model_card(state: ServerState) -> dict:
    info = state.ready().vlm.info
    return {"id": state.cfg.model_id, "object": "model", "created": state.loaded_at,
            "owned_by": "edgevlm", "family": info.family, "precision": info.precision,
            "provider": state.engine.vlm.provider, "context_length": info.max_tokens,
            "image_tokens": info.num_image_tokens, "batching": state.engine.batched}


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}; this server has POST /v1/chat/completions, "
                    "GET /v1/models, /health and /metrics",
               405: f"{request.method} is not allowed on {request.url.path}"}
    return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return APIError(500, f"internal error ({type(exc).__name__}); the server goes on "
                    "serving").response()
