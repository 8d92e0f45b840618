"""Choosing the next token and stopping: greedy, temperature / top-k / top-p, stop strings.

Greedy is `argmax` (first index on ties, like torch.argmax), so an fp32 export reproduces
transformers' greedy `generate`. Sampling applies the filters in transformers' order
(temperature, then top-k, then top-p) to float64 logits, with a per-call numpy Generator so
concurrent calls neither share nor disturb each other's random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.errors import UserError, check_seed


@dataclass(frozen=True)
class GenerationConfig:
    """How one call generates. temperature 0 means greedy (top_p/top_k/seed then unused)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    min_new_tokens: int = 0  # end-of-sequence ids are never picked before this many tokens
    # (transformers' `min_new_tokens`, onnxruntime-genai's `min_length` less the prompt)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p!r} must be in (0, 1] (1 keeps every token)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if not isinstance(self.min_new_tokens, int) or not \
                0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserError(f"min_new_tokens={self.min_new_tokens!r} must be an integer from 0 "
                            f"to max_new_tokens ({self.max_new_tokens})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop={self.stop!r} must be non-empty strings")
        if self.seed is not None:
            check_seed(self.seed, "seed=")


def pick_token(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """The next token id from the last position's logits (V,)."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / cfg.temperature
    if 0 < cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x[x < kth] = -np.inf
    if cfg.top_p < 1:
        order = np.argsort(-x, kind="stable")
        probs = _softmax(x[order])
        # Drop a token once the more likely ones already reach top_p; the first always stays.
        drop = np.cumsum(probs) - probs >= cfg.top_p
        x[order[drop]] = -np.inf
    return int(rng.choice(x.size, p=_softmax(x)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class StopFilter:
    """Passes text through until a stop string appears; holds back a tail that might be the
    start of one, so no piece of a stop string is ever shown."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hit = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else piece
        self._pending += piece
        found = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self._pending = self._pending[: min(found)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s))
                    if self._pending.endswith(s[:k])), default=0)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.hit else self._pending), ""
        return out


class Trim:
    """Streams text as `str.strip` leaves the whole of it: whitespace before the first visible
    character is dropped, and whitespace after one is held back until more visible text follows
    (so an answer's trailing whitespace is never shown). The pieces then join to exactly the
    stripped answer, GenerationResult.text."""

    def __init__(self):
        self._started = False
        self._pending = ""  # whitespace seen since the last visible character

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        body = piece.rstrip()
        if not body:
            self._pending += piece
            return ""
        out, self._pending = self._pending + body, piece[len(body):]
        return out
