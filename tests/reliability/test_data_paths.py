"""An image path a LLaVA data file names that cannot be resolved (a NUL byte, a symlink loop) is
one line naming the entry, as --pref-data's are (issue 33), not a ValueError or RuntimeError."""

from __future__ import annotations

import json

import pytest

from edgevlm.data import load_samples
from edgevlm.errors import UserError

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a"}]


def test_a_nul_byte_or_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    for rel in ("a\u0000b.png", "loop.png"):
        path = tmp_path / "data.json"
        path.write_text(json.dumps([{"id": "x", "image": rel, "conversations": TURNS}]))
        with pytest.raises(UserError, match=r"entry 0: image path .* cannot be resolved"):
            load_samples(path)
