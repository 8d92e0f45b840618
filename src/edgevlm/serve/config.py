"""ServeConfig: what `edgevlm serve` binds to, how much work it takes at once, and the bounds on
one request. Each bound is a command-line flag, and a request past one is refused with a 4xx
that names the flag (FLAGS), so an operator knows which one to raise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError

# field -> the flag that sets it; error messages name the flag, not the field
FLAGS = {
    "max_body_bytes": "--max-body-bytes",
    "max_image_pixels": "--max-image-pixels",
    "max_messages": "--max-messages",
    "max_prompt_tokens": "--max-prompt-tokens",
    "parallel": "--parallel",
    "max_queue": "--max-queue",
    "port": "--port",
    "batching": "--batching",
}
BATCHING = ("auto", "on", "off")  # auto: batched decode where the export allows it (engine.py)


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs. model_id is the name /v1/models lists and requests must use."""

    model_id: str = "edgevlm"
    host: str = "127.0.0.1"  # loopback: another machine reaches it only when told so
    port: int = 8080
    parallel: int = 1  # requests generating at once, each in its own thread on the one VLM
    max_queue: int = 32  # requests waiting for a slot; one more is a 429
    api_key: str | None = None  # every route but /health then needs `Authorization: Bearer KEY`
    media_path: Path | None = None  # local image paths are read only under it (None: refused)
    max_body_bytes: int = 20 * 2**20  # a 1024 px PNG as base64 is ~4 MB; room for a few turns
    max_image_pixels: int = 4096 * 4096  # the runtime's largest resize edge, squared
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # None: the export's context (prompt + answer)
    batching: str = "auto"  # the decode steps of --parallel requests in one decoder pass

    def __post_init__(self):
        for name in ("parallel", "max_body_bytes", "max_image_pixels", "max_messages"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_queue", self.max_queue, 0)
        if self.max_prompt_tokens is not None:
            _at_least("max_prompt_tokens", self.max_prompt_tokens, 1)
        if self.batching not in BATCHING:
            raise UserError(f"--batching {self.batching!r} is unknown; choose one of "
                            f"{', '.join(BATCHING)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port!r} must be an integer from 0 to 65535")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api-key is empty; give a key or leave the flag out")
        if self.media_path is not None and not Path(self.media_path).is_dir():
            raise UserError(f"--media-path {self.media_path} is not a folder; give the folder "
                            "whose images requests may name by path")


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{FLAGS[name]} {value!r} must be an integer of at least {low}")
