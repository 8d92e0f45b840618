"""Programs some tests run besides Python, found one way: the README's set-up provides each
(torch brings torch.distributed.run; `npm ci --prefix tests/js` brings transformers.js), so a
missing one is a failure that names the install step, never a silent skip."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

JS = Path(__file__).parent / "js"
# torchrun as a module of the interpreter running the tests: no PATH lookup, no console script
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def node() -> str:
    """The node executable, with transformers.js installed beside the tests."""
    exe = shutil.which("node")
    assert exe, "node is not installed: install Node.js 18+ (README, Set up)"
    assert (JS / "node_modules" / "@huggingface" / "transformers").is_dir(), (
        "transformers.js is not installed: npm ci --prefix tests/js --ignore-scripts")
    return exe


# edgevlm's progress notes (edgevlm.progress.note), printed before minutes of loading: they may
# precede a refusal, whose error is still the one line that is left
NOTE = re.compile(r"^(loading model|calibration:|resuming:) .*\.\.\.$")


def without_notes(text: str) -> str:
    """`text` less its progress-note lines."""
    return "\n".join(line for line in text.splitlines() if not NOTE.match(line))
