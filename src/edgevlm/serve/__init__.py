"""edgevlm.serve: an export behind OpenAI's chat API (`edgevlm serve`, docs/serve.md).

    from edgevlm.serve import ServeConfig, create_app
    app = create_app(lambda: VLM.load("export"), ServeConfig(model_id="export"))

Starlette on uvicorn, over edgevlm.runtime only: no torch, so a device install plus
`edgevlm[serve]` serves exports.
"""

from __future__ import annotations

from edgevlm.serve.app import create_app
from edgevlm.serve.config import ServeConfig
from edgevlm.serve.server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
