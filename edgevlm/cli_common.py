"""What every `edgevlm` command shares: the stderr console, quiet library logging, and the
closing summary table (or its JSON)."""

from __future__ import annotations

import json
import os

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

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
