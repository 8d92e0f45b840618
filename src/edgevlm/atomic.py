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

One writer per OUT: `check_new` takes an advisory lock on OUT (fcntl.flock on a file named by
the hash of OUT's resolved path, in a per-user folder of the system's temp directory, so nothing
is left beside OUT and the lock goes with its process if that dies), which this process keeps
until `atomic_dir` has put OUT in place or the process ends; a second command writing the same
OUT is refused in one line instead of both succeeding and one result being lost. Under torchrun,
rank 0 holds it for the group.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgevlm.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per OUT is the user's to keep
    fcntl = None

ARTIFACT_MARKERS = ("edgevlm.json", "config.json", "quant_report.json", "train.json",
                    "eval.json", "bench.json", "report.json", "plan.json")


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


_HELD: dict[Path, int] = {}  # OUT (resolved) -> the open lock file this process holds


def _lock_path(out: Path) -> Path:
    folder = Path(tempfile.gettempdir()) / f"edgevlm-locks-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot keep edgevlm's output locks in {folder} ({e.strerror}); set "
                        "TMPDIR to a folder you can write") from e
    if folder.stat().st_uid != os.getuid():
        raise UserError(f"{folder} belongs to another user, so edgevlm cannot keep its output "
                        "locks there; remove it, or set TMPDIR to a folder of your own")
    return folder / (hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32] + ".lock")


def lock(out: str | Path) -> None:
    """Hold OUT's writer lock for this process (see the module docstring); a UserError naming
    the process that holds it when another does. Rank > 0 of a torchrun group takes none."""
    out = Path(out)
    key = out.resolve()
    if fcntl is None or key in _HELD or os.environ.get("RANK", "0") not in ("", "0"):
        return
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{out} is being written by another edgevlm command (process "
                            f"{holder}); wait for it to finish, or choose another "
                            "output") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the holder removed this file as it let go: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd


def unlock(out: str | Path) -> None:
    """Let OUT's writer lock go (its file is removed while still held, so no waiter sees a
    stale one)."""
    fd = _HELD.pop(Path(out).resolve(), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            _lock_path(Path(out)).unlink()
        os.close(fd)


def check_new(out: str | Path, overwrite: bool,
              inputs: Sequence[str | Path | None] = ()) -> None:
    """OUT may be written: it does not exist, or `overwrite` and replacing it is safe (see the
    module docstring), and no other command is writing it (this one takes the lock); else a
    UserError that says why and what to do."""
    out = Path(out)
    where = out.resolve()
    check_inputs(out, inputs)
    lock(out)
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
    try:
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
    finally:
        unlock(out)
