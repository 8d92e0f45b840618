"""The machine's bounds on what a run may ask for: threads, KV-cache memory, image sizes, the
image-feature cache.

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

# The largest image-feature cache in MB on any machine (64 GiB): a LLaVA-1.5 image is 9.4 MB
# of features, so this holds thousands; check_cache_mb also caps it at half the memory.
MAX_CACHE_MB = 65536

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


def check_cache_mb(value, name: str = "image_cache_mb") -> None:
    """A cache bound in MB is a whole number from 0 (off) to half the machine's physical memory
    (MAX_CACHE_MB where the OS does not say): the model, its KV cache and the images being
    decoded need the other half, and a bound past that would let one process's cache, filled by
    its callers' images, exhaust the host."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{name}={shown(value)} must be a whole number of MB, 0 to turn the cache "
                        "off")
    memory = machine_memory()
    cap = min(MAX_CACHE_MB, memory // 2 // 2**20) if memory is not None else MAX_CACHE_MB
    if value > cap:
        raise UserError(f"{name}={value} MB is more than the {cap} MB this machine allows (half "
                        f"its physical memory, at most {MAX_CACHE_MB}); give at most {cap}")


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
