"""Progress of long work on stderr: a rich bar on a terminal, plain lines in a log file.

Everything goes to stderr, so `--json` output on stdout stays machine-readable.

rich draws nothing while its output is not a terminal (it prints the finished bar once, at the
end), so a training or quantization run logged to a file showed no progress for hours. There
each update becomes a plain line instead, at most one every LOG_EVERY_S seconds plus the first
step and the last:

    quantize gptq: 3/30 layers (10%) 41.2 s/it, ETA 18:32 (elapsed 2:03) err=0.012

Rate and ETA come from the steps done in this run (a resumed run does not count the steps it
resumed from, which took no time here), from the first completed step on. rich's own
TimeRemainingColumn waits for several speed samples and shows `-:--:--` meanwhile, which on a
GPTQ block of a minute or more is many minutes; the bar's ETA column here is the same estimate
as the lines'.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as _RichProgress
from rich.text import Text

# Plain lines: often enough that a stalled run shows in its log within seconds of it, rarely
# enough that a ten-hour run writes ~2,400 lines rather than one per step.
LOG_EVERY_S = 15.0


@dataclass(frozen=True)
class Estimate:
    """Speed and time left from `done` steps in `elapsed` seconds; None before any step."""

    rate: float | None  # steps per second
    eta: float | None  # seconds left


def estimate(done: int, remaining: int, elapsed: float) -> Estimate:
    if done <= 0 or elapsed <= 0:
        return Estimate(None, None)
    rate = done / elapsed
    return Estimate(rate, max(remaining, 0) / rate)


def clock_text(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour on; -:-- when unknown."""
    if seconds is None:
        return "-:--"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate_text(rate: float | None) -> str:
    """Seconds per step when a step takes a second or more, else steps per second."""
    if rate is None:
        return "-- s/it"
    return f"{1 / rate:.1f} s/it" if rate <= 1 else f"{rate:.1f} it/s"


def terms_text(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in terms.items())


def note(message: str, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One line to stderr (`stream`) saying what is happening, e.g. before minutes of loading a
    model, when nothing else would be printed meanwhile."""
    if enabled:
        print(message, file=stream or sys.stderr, flush=True)


class _EtaColumn(ProgressColumn):
    """The bar's ETA: the owning Progress's estimate, counting down between updates."""

    def __init__(self, owner: Progress):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        return Text(f"ETA {clock_text(self.owner.eta(self.owner.clock()))}",
                    style="progress.remaining")


class Progress:
    """`with Progress("train", total, unit="steps") as bar: bar.update(1, loss=0.3)`.

    `completed`: steps already done before this run (a resumed run). `stream` (default stderr)
    and `clock` are there for tests; `every`: seconds between plain lines."""

    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool = True,
                 unit: str = "", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, every: float = LOG_EVERY_S):
        self.enabled = enabled
        self.description, self.unit = description, unit
        self.total, self.completed, self.start = total, completed, completed
        self.stream, self.clock, self.every = stream, clock, every
        self.terms: dict[str, float] = {}
        self._bar = None
        self._plain = False
        self._t0 = self._t_update = 0.0
        self._printed_at: float | None = None  # clock time of the last plain line
        self._unprinted = False  # an update since the last plain line

    def __enter__(self):
        if not self.enabled:
            return self
        stream = self.stream or sys.stderr
        self._t0 = self._t_update = self.clock()
        console = Console(file=stream)
        if not console.is_interactive:  # a file, a pipe or a dumb terminal: rich would not draw
            self._plain = True
            return self
        self._bar = _RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), _EtaColumn(self),
            console=console, transient=False)
        self._bar.__enter__()
        self._task = self._bar.add_task(self.description, total=self.total,
                                        completed=self.completed, info="")
        return self

    def estimate(self) -> Estimate:
        """From this run's steps, as of the last update."""
        return estimate(self.completed - self.start, self.total - self.completed,
                        self._t_update - self._t0)

    def eta(self, now: float) -> float | None:
        """Seconds left at clock time `now`: the last update's estimate, less the time since."""
        left = self.estimate().eta
        return None if left is None else max(left - (now - self._t_update), 0.0)

    def line(self) -> str:
        """The plain-text line of the current state."""
        est = self.estimate()
        pct = 100 * self.completed / self.total if self.total else 100.0
        unit = f" {self.unit}" if self.unit else ""
        text = (f"{self.description}: {self.completed}/{self.total}{unit} ({pct:.0f}%) "
                f"{rate_text(est.rate)}, ETA {clock_text(est.eta)} "
                f"(elapsed {clock_text(self._t_update - self._t0)})")
        return f"{text} {terms_text(self.terms)}" if self.terms else text

    def update(self, n: int = 1, **terms: float) -> None:
        if not self.enabled:
            return
        self.completed += n
        self.terms = terms
        self._t_update = self.clock()
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=terms_text(terms))
        elif self._plain:
            due = (self._printed_at is None or self.completed >= self.total
                   or self._t_update - self._printed_at >= self.every)
            self._unprinted = True
            if due:
                self._print()

    def _print(self) -> None:
        print(self.line(), file=self.stream or sys.stderr, flush=True)
        self._printed_at, self._unprinted = self._t_update, False

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self._plain and self._unprinted:  # where it stopped, if that line was throttled
            self._print()
        return False
