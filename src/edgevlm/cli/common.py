"""What every `edgevlm` command shares: the stderr console, quiet library logging, the
closing summary table (or its JSON) and the next command to run."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(stderr=True)

SAVE_MINUTES_HELP = ("Also checkpoint when this many minutes passed since the last checkpoint "
                     "(e.g. 30), so a kill loses at most that much work however long a step "
                     "takes; --resume continues from the latest checkpoint of either kind")
IMAGE_ROOT_HELP = ("Folder the data file's image paths are relative to (default: the folder of "
                   "the JSON file)")


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def summary(title: str, rows: dict, quiet: bool = False, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    if quiet:
        return
    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        table.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def show_next(commands: list[str], quiet: bool = False, as_json: bool = False) -> None:
    """The next command(s) to run, on stderr after the summary; none under --quiet or --json."""
    if quiet or as_json or not commands:
        return
    for i, command in enumerate(commands):
        # Text, not markup: a path may hold [brackets]; soft_wrap keeps a command one line to
        # copy, however narrow the terminal.
        console.print(Text("next: " if i == 0 else "      ", style="bold") + Text(command),
                      soft_wrap=True, highlight=False)


MAX_LENGTH_HELP = ("Tokens per sample, image tokens included (default: 1024, or the model's "
                   "max_position_embeddings if smaller)")
LONG_SAMPLES_HELP = ("A sample over --max-length: truncate (after its image tokens and first "
                     "prompt; skipped if even those do not fit) | skip")

# Options that `edgevlm train` and `edgevlm distill` share, declared once (Typer's Annotated
# style: `lr: LrOpt = 1e-3`; the default stays in the signature).
BatchSizeOpt = Annotated[int, typer.Option(help="Per process")]
LrOpt = Annotated[float, typer.Option()]
WarmupOpt = Annotated[int, typer.Option()]
SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N steps")]
SaveMinutesOpt = Annotated[Optional[float], typer.Option(help=SAVE_MINUTES_HELP)]
SeedOpt = Annotated[int, typer.Option()]
MaxLengthOpt = Annotated[Optional[int], typer.Option(help=MAX_LENGTH_HELP)]
LongSamplesOpt = Annotated[str, typer.Option(help=LONG_SAMPLES_HELP)]
QuietOpt = Annotated[bool, typer.Option()]
JsonOpt = Annotated[bool, typer.Option("--json")]


def fit_rows(fit, prefix: str = "") -> dict:
    """Summary rows of a FitReport: what the length limit did to the data."""
    return {f"{prefix}text-only": fit.text_only, f"{prefix}max length": fit.max_length,
            f"{prefix}truncated": len(fit.truncated),
            f"{prefix}skipped (too long)": len(fit.skipped)}
