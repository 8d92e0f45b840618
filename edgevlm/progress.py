"""Rich progress bars with rate, ETA and the latest loss terms; silent when disabled.

Bars go to stderr, so `--json` output on stdout stays machine-readable.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress


class Progress:
    """`with Progress("train", total) as bar: bar.update(1, loss=0.3)`."""

    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.description = description
        self.total, self.completed = total, completed
        self._bar = None

    def __enter__(self):
        if self.enabled:
            self._bar = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total,
                                            completed=self.completed, info="")
        return self

    def update(self, n: int = 1, **terms: float) -> None:
        if self._bar is not None:
            info = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
            self._bar.update(self._task, advance=n, info=info)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
