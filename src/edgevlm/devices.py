"""Which torch device and dtype a toolkit command runs on (`--device auto|cpu|cuda`)."""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.models import read_config

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, flag: str = "--device") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without one is named."""
    import torch

    if name not in DEVICES:
        raise UserError(f"{flag} {name!r}: use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise UserError(f"{flag} cuda, but torch {torch.__version__} sees no CUDA device (a CPU "
                        f"build of torch, or no GPU or driver); use {flag} cpu or {flag} auto")
    return ("cuda" if cuda else "cpu") if name == "auto" else name


def checkpoint_dtype(model_dir: str | Path):
    """The dtype config.json records for the weights (float32 when it records none)."""
    import torch

    cfg = read_config(model_dir)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get(
        "dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
