"""Run the app on uvicorn. uvicorn's own shutdown is the graceful one the issue asks for: on
SIGTERM (or Ctrl-C) it stops accepting connections, lets the requests in flight finish, then
runs the app's shutdown, which waits for the generation threads."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edgevlm.errors import UserError
from edgevlm.serve.app import create_app
from edgevlm.serve.config import ServeConfig


def serve(load: Callable[[], object], cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT. A load that fails stops the server and raises UserError."""
    import uvicorn

    app = create_app(load, cfg)
    state = app.state.serve
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port,
                                           log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=None))

    def stop(error: BaseException) -> None:
        logging.getLogger("uvicorn.error").error("cannot load the export: %s", error)
        server.should_exit = True

    state.on_load_error = stop
    server.run()
    if state.load_error is not None:
        raise UserError(str(state.load_error)) from state.load_error
