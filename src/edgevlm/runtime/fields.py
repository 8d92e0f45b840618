"""Typed reading of an export's JSON files, each confined to the export folder.

An export's edgevlm.json and the Hugging Face files copied beside it are data from whoever
made the export. `read_json` opens one only when it resolves (symlinks followed) inside the
export, and `Fields` hands out each value as the type the runtime needs (an integer, a string,
a token id, a nested object): a field of another type is one line naming the file and the field,
instead of a TypeError, ValueError or AttributeError wherever the value is first used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgevlm.errors import UserError
from edgevlm.runtime.limits import shown
from edgevlm.runtime.paths import check_inside

REEXPORT = "re-run `edgevlm export MODEL --out DIR`"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_TOKEN_ID = 2**31 - 1  # tokenizers and onnxruntime's int64 ids hold any id a vocabulary has


def is_id(value) -> bool:
    return is_int(value) and 0 <= value <= MAX_TOKEN_ID


class Fields:
    """One JSON object of an export's files, each field read as the type the runtime needs: a
    field of another type is a UserError naming the file and the field, not a traceback later."""

    def __init__(self, path: Path, data: dict, prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def checked(self, key: str, ok, what: str):
        """The value at `key` (None when absent or null) when `ok(value)`, else a UserError
        saying it is not `what`."""
        value = self.data.get(key)
        if value is None or ok(value):
            return value
        raise UserError(f"{self.path}: {self.prefix}{key} is {shown(value)}, which is not "
                        f"{what}; {REEXPORT}")

    def integer(self, key: str) -> int | None:
        return self.checked(key, is_int, "an integer")

    def text(self, key: str) -> str | None:
        return self.checked(key, lambda v: isinstance(v, str), "a string")

    def token(self, key: str) -> int | None:
        return self.checked(key, is_id, f"a token id (0 to {MAX_TOKEN_ID})")

    def ids(self, key: str) -> tuple[int, ...] | None:
        value = self.checked(key, lambda v: is_id(v) or (isinstance(v, list)
                                                         and all(is_id(i) for i in v)),
                          f"a token id (0 to {MAX_TOKEN_ID}) or a list of them")
        return None if value is None else tuple(value) if isinstance(value, list) else (value,)

    def obj(self, key: str) -> Fields:
        """A nested object (empty when absent)."""
        value = self.checked(key, lambda v: isinstance(v, dict), "a JSON object")
        return Fields(self.path, value or {}, f"{self.prefix}{key}.")


def read_json(root: Path, name: str, required: bool = False) -> Fields:
    """The JSON object in the export's file `name` (empty when the file is absent)."""
    path = check_inside(root, root / name, name)
    if not path.is_file():
        if required:
            raise UserError(f"{root} is not an edgevlm export (no {name}); make one "
                            "with `edgevlm export MODEL --out DIR`")
        return Fields(path, {})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8, a 5000-digit number
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); {REEXPORT}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; {REEXPORT}")
    return Fields(path, data)
