"""The machine's bounds on what a run may ask for: threads, KV-cache memory, image sizes.

Every number the runtime would size a resource by — the `--threads` option, the KV buffers an
edgevlm.json's `decoder.max_context` implies, an image processor's resize target — is checked
here against the machine (usable cores, physical memory) or a stated bound before anything is
allocated, so a typo or a crafted file ends in one line naming the limit instead of 30,000
threads, a 4 GB cache or a MemoryError inside PIL.
"""

from __future__ import annotations

import os

from edgevlm.errors import UserError

# The longest image edge an image processor may resize to. transformers bounds Idefics3's
# resized edges by the same 4096 px (runtime.tiling.MAX_IMAGE_SIZE); vision encoders take
# 224-1536 px, and a 4096 x 4096 float32 image is already 200 MB of pixel values.
MAX_IMAGE_EDGE = 4096

# Bytes per KV element when edgevlm.json does not say: float32, the widest the runtime uses.
KV_BYTES = {"fp16": 2, "fp32": 4}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def machine_memory() -> int | None:
    """Physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_threads(threads) -> None:
    """`threads` (None: onnxruntime's default) is a whole number from 1 to the usable cores:
    more intra-op threads than cores only contend (and 10^5 of them exhaust the host)."""
    if threads is None:
        return
    cores = usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads={threads!r} must be a positive integer (or None for "
                        "onnxruntime's default, one per physical core)")
    if threads > cores:
        raise UserError(f"--threads {threads} is more than the {cores} CPU cores this process "
                        f"may run on; give at most {cores}, or leave --threads out for "
                        "onnxruntime's default")


def kv_bytes(layers: int, kv_heads: int, head_dim: int, positions: int,
             element: int = 4) -> int:
    """Bytes of a KV cache: a key and a value buffer per layer, (kv_heads, positions, head_dim)."""
    return layers * 2 * kv_heads * head_dim * positions * element


def check_kv_memory(nbytes: int, what: str, fix: str) -> None:
    """A KV cache of `nbytes` fits the machine's physical memory, or a UserError: `what` needs
    it, `fix` says what would make it smaller."""
    memory = machine_memory()
    if memory is not None and nbytes > memory:
        raise UserError(f"{what} needs a {_gib(nbytes)} KV cache, more than this machine's "
                        f"{_gib(memory)} of memory; {fix}")


def check_image_edge(value, name: str, source: str) -> None:
    """An image processor size field is a positive integer of at most MAX_IMAGE_EDGE px."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"image processor {name}={shown(value)} must be a positive integer; "
                        f"fix it in {source}")
    if value > MAX_IMAGE_EDGE:
        raise UserError(f"image processor {name}={value} is over the {MAX_IMAGE_EDGE} px this "
                        f"runtime resizes an image edge to (transformers' own bound); fix it in "
                        f"{source}")


def _gib(n: int) -> str:
    if n.bit_length() > 80:  # past a float's comfort (crafted sizes multiply to 10^500)
        return f"2^{n.bit_length() - 1}-byte"
    return f"{n / 2**30:,.1f} GiB"


def shown(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: a crafted value must not make the line long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
