"""`edgevlm serve`: an export behind OpenAI's chat API (edgevlm.serve, docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgevlm.errors import UserError


def serve_(
    export_dir: Path = typer.Argument(..., help="Export folder made by `edgevlm export`"),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 "
                             "opens it to the network)"),
    port: int = typer.Option(8080),
    parallel: int = typer.Option(1, help="Requests generating at once (threads on one model)"),
    batching: str = typer.Option("auto", help="auto|on|off: run the decode steps of the "
                                 "--parallel requests in one decoder pass (auto: for builder "
                                 "exports on the CPU, where the engine can)"),
    max_queue: int = typer.Option(32, help="Requests that may wait for a slot; more get 429"),
    api_key: Optional[str] = typer.Option(None, envvar="EDGEVLM_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on every "
                                          "route but /health"),
    media_path: Optional[Path] = typer.Option(None, help="Folder whose images requests may "
                                              "name by local path (default: local paths "
                                              "refused)"),
    model_id: Optional[str] = typer.Option(None, help="Model name clients use (default: the "
                                           "export folder's name)"),
    max_body_bytes: int = typer.Option(20 * 2**20, help="Largest request body (413 past it)"),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Largest image, width x height "
                                         "(413 past it)"),
    max_messages: int = typer.Option(256, help="Most messages in one request (400 past it)"),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longest prompt in tokens, "
                                                    "image tokens included (default: the "
                                                    "export's context; 400 past it)"),
    provider: str = typer.Option("auto", help="auto|cpu|cuda|tensorrt|coreml|nnapi|qnn|dml"),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: ORT's)"),
    precision: Optional[str] = typer.Option(None, help="fp32|fp16|int8|int4 graphs of the "
                                            "export (default: the manifest's)"),
    image_cache_mb: int = typer.Option(256, help="Keep image features by image hash, up to "
                                       "this many MB (LRU), so a second question on an image "
                                       "skips the vision encoder; 0: off"),
    log_level: str = typer.Option("info", help="uvicorn's: critical|error|warning|info|debug"),
) -> None:
    """Serve an export with the OpenAI chat API (/v1/chat/completions, /v1/models, /health,
    /metrics) on Starlette + uvicorn; SIGTERM finishes the requests in flight, then exits."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise UserError(f"`edgevlm serve` needs the serve extra ({e.name} is not installed): "
                        "pip install 'edgevlm[serve]'") from e
    from edgevlm.runtime import VLM
    from edgevlm.runtime.limits import check_cache_mb, check_threads
    from edgevlm.serve import ServeConfig, serve

    if not (export_dir / "edgevlm.json").is_file():
        raise UserError(f"{export_dir} is not an export (no edgevlm.json); run `edgevlm export "
                        "MODEL --out DIR` and pass DIR")
    check_threads(threads)
    check_cache_mb(image_cache_mb, "--image-cache-mb")
    cfg = ServeConfig(model_id=model_id or export_dir.resolve().name, host=host, port=port,
                      parallel=parallel, batching=batching, max_queue=max_queue,
                      api_key=api_key,
                      media_path=media_path, max_body_bytes=max_body_bytes,
                      max_image_pixels=max_image_pixels, max_messages=max_messages,
                      max_prompt_tokens=max_prompt_tokens)

    def load():
        return VLM.load(export_dir, provider=provider, threads=threads, precision=precision,
                        image_cache_mb=image_cache_mb)

    serve(load, cfg, log_level)
