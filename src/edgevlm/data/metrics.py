"""Normalized exact match, the accuracy every edgevlm stage reports (torch-free)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

_DIGITS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
           "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, spell small numbers, collapse spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    words = [_DIGITS.get(w, w) for w in re.split(r"\s+", text) if w and w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def percent(accuracy: float) -> str:
    """An accuracy as every table, report and summary prints it: percent, one decimal
    ("63.7%"). Files a program reads (bench.json, eval --json) keep the fraction."""
    return "–" if accuracy != accuracy else f"{100 * accuracy:.1f}%"  # nan: nothing scored


@dataclass
class Score:
    """Accuracy overall and per question type; `add` one answer at a time."""

    correct: int = 0
    total: int = 0
    per_type: dict[str, list[int]] = field(default_factory=dict)  # type -> [correct, total]

    def add(self, prediction: str, reference: str, qtype: str = "all") -> bool:
        ok = exact_match(prediction, reference)
        self.correct += ok
        self.total += 1
        c = self.per_type.setdefault(qtype, [0, 0])
        c[0] += ok
        c[1] += 1
        return ok

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def type_accuracy(self) -> dict[str, float]:
        return {t: c / n for t, (c, n) in sorted(self.per_type.items())}

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "per_type": self.type_accuracy()}
