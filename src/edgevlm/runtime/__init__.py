"""edgevlm.runtime: run an edgevlm export with ONNX Runtime; no torch, no transformers.

    from edgevlm.runtime import VLM
    vlm = VLM.load("export_dir", provider="auto")
    print(vlm.generate("photo.png", "What is in the picture?").text)

Imports numpy, onnxruntime, tokenizers, pillow, jinja2 and the standard library only, so a device
with `pip install edgevlm` runs exports. The names below load on first use (PEP 562), so the
exporter can import `edgevlm.runtime.contract` without pulling in onnxruntime.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "VLM": "edgevlm.runtime.model",
    "GenerationResult": "edgevlm.runtime.results",
    "Timings": "edgevlm.runtime.results",
    "Stream": "edgevlm.runtime.results",
    "GenerationConfig": "edgevlm.runtime.sampling",
    "ImageProcessorConfig": "edgevlm.runtime.preprocess",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgevlm.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
