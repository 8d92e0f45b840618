"""The shape of bench.json, checked before `bench --compare`, `edgevlm plan` or the demo reads
a number from it (issue 33).

A report is a file a user may edit, copy between devices or mistake for another: a field of the
wrong type must end in one line that names the file, the field and the fix, not in a TypeError
three calls later, and no number outside its meaning may be taken (a NaN time to first token
sits inside every budget, an accuracy of 7 wins every plan). The schema is data, one entry per
field, in the order of report.py's dataclasses; `check_report` walks it. Fields a newer version
adds are ignored, so an older edgevlm still reads a newer report. `read_json` parses the file
first, bounded in size, and turns every way a file fails to be JSON into one line too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.errors import UserError

INT_MAX = 2**63  # larger is no count or size of this world, and overflows float math
MAX_REPORT_BYTES = 1 << 30  # 5000 samples x 10 targets is ~15 MB; parsing 1 GiB takes ~10 GiB


class _Bad(Exception):
    """A field that does not match: where (a JSON path), its value, what it should be."""

    def __init__(self, at: str, value, expected: str, lacks: tuple[str, ...] = ()):
        super().__init__(at)
        self.at, self.value, self.expected, self.lacks = at, value, expected, lacks


@dataclass(frozen=True)
class Num:
    """A finite number (an integer if `integer`) from `low` to `high`; None if `null`."""

    low: float = 0
    high: float = math.inf
    integer: bool = False
    null: bool = False

    def check(self, value, at: str) -> None:
        if value is None and self.null:
            return
        kind = int if self.integer else (int, float)
        ok = (isinstance(value, kind) and not isinstance(value, bool)
              and (isinstance(value, int) or math.isfinite(value))
              and self.low <= value <= min(self.high, INT_MAX))
        if not ok:
            raise _Bad(at, value, self.describe())

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        span = (f" from {self.low:g} to {self.high:g}" if self.high < math.inf
                else f" of at least {self.low:g}")
        return what + span + (" or null" if self.null else "")


@dataclass(frozen=True)
class Str:
    """A string (one of `choices`, when given); None if `null`."""

    choices: tuple[str, ...] = ()
    null: bool = False

    def check(self, value, at: str) -> None:
        if value is None and self.null:
            return
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            raise _Bad(at, value, self.describe())

    def describe(self) -> str:
        what = f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a string"
        return what + (" or null" if self.null else "")


@dataclass(frozen=True)
class MapOf:
    """An object whose values all match `value` (keys are strings in any JSON)."""

    value: object = None  # a spec, or None: anything

    def check(self, v, at: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(at, v, "an object")
        if self.value is not None:
            for k, item in v.items():
                self.value.check(item, f"{at}[{k!r}]")


@dataclass(frozen=True)
class ListOf:
    item: object

    def check(self, v, at: str) -> None:
        if not isinstance(v, list):
            raise _Bad(at, v, "a list")
        for i, item in enumerate(v):
            self.item.check(item, f"{at}[{i}]")


@dataclass(frozen=True)
class Obj:
    """An object with these fields (those in `optional` may be missing; others are ignored),
    then `rule`: a check across fields that raises _Bad."""

    fields: dict
    optional: frozenset = frozenset()
    rule: Callable[[dict, str], None] | None = field(default=None, compare=False)

    def check(self, v, at: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(at, v, "an object")
        missing = [k for k in self.fields if k not in v and k not in self.optional]
        if missing:
            raise _Bad(at, v, "", lacks=tuple(missing))
        for k, spec in self.fields.items():
            if k in v:
                spec.check(v[k], f"{at}.{k}" if at else k)
        if self.rule is not None:
            self.rule(v, at)


def _spread_rule(v: dict, at: str) -> None:
    """An empty spread (n 0) is all null (bench.json's nan); else all three are numbers. (Their
    order is not required: a report edited to try another median stays readable.)"""
    values = [v["p10"], v["median"], v["p90"]]
    if v["n"] == 0 and any(x is not None for x in values):
        raise _Bad(f"{at}.median", v["median"], "null, as n is 0 (no measurement)")
    if v["n"] > 0 and any(x is None for x in values):
        raise _Bad(at, values, "[p10, median, p90] numbers, as n > 0")


def _measured_rule(v: dict, at: str) -> None:
    _spread_rule(v, at)
    if v["n"] == 0:  # the planner compares every target by its median TTFT
        raise _Bad(f"{at}.n", 0, "at least 1: every target has timed answers")


def _spread(rule=_spread_rule) -> Obj:
    seconds = Num(null=True)
    return Obj({"median": seconds, "p10": seconds, "p90": seconds,
                "n": Num(integer=True)}, rule=rule)


def _target_rule(v: dict, at: str) -> None:
    if v["correct"] > v["total"]:
        raise _Bad(f"{at}.correct", v["correct"], f"at most total ({v['total']})")


_BYTES = Num(integer=True, null=True)
_FRACTION = Num(0, 1)  # accuracy: 0.5 is 50%

MACHINE = Obj({"label": Str(), "cpu": Str(), "logical_cores": Num(integer=True, null=True),
               "physical_cores": Num(integer=True, null=True), "ram_bytes": _BYTES,
               "os": Str(), "python": Str(), "versions": MapOf(Str())})

PREDICTION = Obj({"id": Str(), "type": Str(), "reference": Str(), "prediction": Str()},
                 optional=frozenset({"type", "reference", "prediction"}))

TARGET = Obj({
    "name": Str(), "path": Str(), "kind": Str(("export", "model")), "backend": Str(),
    "provider": Str(), "precision": Str(), "threads": Num(1, integer=True, null=True),
    "accuracy": _FRACTION, "correct": Num(integer=True), "total": Num(1, integer=True),
    "per_type": MapOf(_FRACTION), "ttft_s": _spread(_measured_rule), "vision_s": _spread(),
    "prefill_s": _spread(), "decode_tokens_per_s": _spread(), "preprocess_s": _spread(),
    "n_prompt_tokens": Num(integer=True), "mean_new_tokens": Num(),
    "timed_runs": Num(integer=True), "load_s": Num(), "baseline_rss_bytes": _BYTES,
    "loaded_rss_bytes": _BYTES, "peak_rss_bytes": _BYTES, "disk_bytes": Num(integer=True),
    "files": ListOf(Str()), "versions": MapOf(Str()), "predictions": ListOf(PREDICTION),
    "device": Str(), "family": Str(), "visual_tokens": Num(integer=True, null=True),
    "weight_bits": Num(1, 64, integer=True, null=True),
}, optional=frozenset({"device", "family", "visual_tokens", "weight_bits"}), rule=_target_rule)

REPORT = Obj({
    "created": Str(), "data": Str(), "n_samples": Num(integer=True), "config": MapOf(),
    "machines": MapOf(MACHINE), "targets": ListOf(TARGET), "sources": ListOf(Str()),
    "note": Str(), "eval_sha256": Str(),
}, optional=frozenset({"created", "data", "n_samples", "config", "sources", "note",
                       "eval_sha256"}))


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < INT_MAX else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def check_report(data, where: str) -> None:
    """`data` (bench.json, parsed) matches REPORT, else a UserError naming `where`, the field,
    its value and what it should be."""
    if not isinstance(data, dict) or not {"machines", "targets"} <= set(data):
        raise UserError(f"{where} is not a bench report (no 'machines' and 'targets'); "
                        "give the bench.json that `edgevlm bench --report DIR` wrote")
    try:
        REPORT.check(data, "")
    except _Bad as e:
        if e.lacks:
            raise UserError(f"{where}: {e.at or 'the report'} lacks {', '.join(e.lacks)}; it was "
                            "not written by `edgevlm bench` (or by an older version): re-run "
                            "the bench") from None
        raise UserError(f"{where}: {e.at} is {_shown(e.value)}, not {e.expected}; correct "
                        "that field, or re-run `edgevlm bench ... --report DIR` to write the "
                        "report again") from None


def read_json(path: Path):
    """The parsed contents of a report file, or a UserError naming it: unreadable, too large,
    not JSON, or nested past Python's recursion limit."""
    try:
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise UserError(f"{path} is {size / 2**20:.0f} MiB, more than any bench report "
                            f"({MAX_REPORT_BYTES >> 20} MiB at most); give a bench.json file")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read bench report {path} ({e.strerror or e}); check the path "
                        "and its permissions") from e
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        # and an integer of over 4300 digits, which Python refuses to convert
        what = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{path} is not valid JSON ({what}); give a bench.json file") from None
