"""Atomic output folders: build beside the target, rename when complete (STYLE.md rule 15).

An OUT is replaced (`--overwrite`) only when it is safe to:
  * it is not, does not contain and is not inside any input of the command (the model being
    exported or quantized, the LM an init grafts, the data a model trains on), so no command
    rewrites what it reads;
  * it is an artifact edgevlm writes (it holds one of ARTIFACT_MARKERS: an export's
    edgevlm.json, a model's config.json, a data set's train.json, a bench report), or empty, so
    `--overwrite` can never delete a folder of the user's own files.
Each run's temporary folder is named `.OUT.<pid>.<random>.tmp`; a run sweeps the ones a dead
process left beside its OUT (killed exports and quantizations) before it starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgevlm.errors import UserError

ARTIFACT_MARKERS = ("edgevlm.json", "config.json", "quant_report.json", "train.json",
                    "eval.json", "bench.json", "report.json")


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_inputs(out: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """OUT is not, does not contain and does not lie inside any of `inputs` (None: skipped)."""
    where = Path(out).resolve()
    for src in inputs:
        if src is not None and _related(where, Path(src).resolve()):
            raise UserError(f"--out {out} is, contains or lies inside the input {src}; "
                            "writing there would change what this command reads: choose an "
                            "output folder elsewhere")


def check_new(out: str | Path, overwrite: bool,
              inputs: Sequence[str | Path | None] = ()) -> None:
    """OUT may be written: it does not exist, or `overwrite` and replacing it is safe (see the
    module docstring); else a UserError that says why and what to do."""
    out = Path(out)
    where = out.resolve()
    check_inputs(out, inputs)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another output or pass --overwrite")
    if where in (Path.home().resolve(), Path(where.anchor), Path.cwd().resolve()):
        raise UserError(f"--out {out} is {where}, which --overwrite would delete; choose a "
                        "new folder for the output")
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder edgevlm wrote; remove or "
                        "rename it yourself, or choose another output")
    if any(out.iterdir()) and not any((out / m).is_file() for m in ARTIFACT_MARKERS):
        raise UserError(f"--out {out} holds files edgevlm did not write (none of "
                        f"{', '.join(ARTIFACT_MARKERS[:3])} ...), so --overwrite will not delete "
                        "it; choose another output, or empty or remove that folder yourself")


def work_dir(out: str | Path) -> Path:
    """`.OUT.work` beside OUT: what a long stage keeps for a killed run to resume from (train's
    checkpoints, quantize's finished blocks); the stage removes it once OUT is complete."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove the temporary folders of `out` whose process is gone; returns them."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        parts = tmp.name[len(out.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _alive(int(parts[0])) and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False,
               inputs: Sequence[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.

    On any failure the temporary folder is removed and an existing `out` is left untouched.
    """
    out = Path(out)
    check_new(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp",
                                dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
