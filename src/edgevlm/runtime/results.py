"""What a runtime call gives back: the answer (`GenerationResult`), where its time went
(`Timings`), and the `Stream` that yields its text pieces before it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    """Where the time of one call went; the decode rate excludes the first token (it comes from
    the prefill pass)."""

    preprocess_s: float  # chat template, tokenization, image decode + resize + normalize
    vision_s: float  # vision encoder (0 without an image)
    prefill_s: float  # token embedding + decoder pass over the whole prompt
    ttft_s: float  # call start -> first token chosen
    decode_s: float  # every decoder step after the first token
    decode_tokens_per_s: float  # decoder steps after prefill / decode_s; nan if there were none
    total_s: float
    n_prompt_tokens: int  # after image-token expansion
    n_new_tokens: int
    image_resized_from: tuple[int, int] | None = None  # (W, H) of an image that was resized
    # to the vision encoder's input size (the fixed size of a mobile export)
    image_cached: bool = False  # the image's features came from the image cache (vision_s ~ 0)


@dataclass(frozen=True)
class GenerationResult:
    """One answer. `text` is trimmed of surrounding whitespace, as the torch reference reports
    it, and is exactly what `stream` yields, joined; `token_ids` are the generated ids without
    the end-of-sequence token."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "eos" | "stop" (a stop string) | "length"
    timings: Timings


class Stream:
    """Iterate for text pieces; afterwards `result` holds the GenerationResult."""

    def __init__(self, steps: Iterator[str]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        if self.result is None:  # a second loop over a finished stream yields nothing
            self.result = yield from self._steps
