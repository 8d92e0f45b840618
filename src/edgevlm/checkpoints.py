"""Training checkpoints and exact resume: where a run keeps its checkpoints (`.OUT.work`), when
it saves one, loading one back, and the settings a resume must share with the run that made
them (saved beside the checkpoints when the run starts)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from edgevlm.atomic import work_dir
from edgevlm.data import FitReport
from edgevlm.errors import UserError

log = logging.getLogger(__name__)

# What a resumed run may change: these decide only when checkpoints are written and how many
# loader processes read the data, never what a step computes. Every other setting is part of
# the run: steps and warmup shape the schedule; batch_size, seed, the data and the process
# count fix the batches; lr, weight_decay, stage, train_vision, max_length, long_samples,
# visual_tokens and token_select change the math (and a different stage or train_vision no
# longer fits the checkpoint's optimizer at all).
MAY_CHANGE_ON_RESUME = ("save_every", "save_every_minutes", "workers")
RESUME_SETTINGS = "resume_settings.json"  # in the work folder, beside checkpoints/


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((work_dir(out) / "checkpoints").glob("step_*[0-9]"),
                   key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def run_settings(cfg, fitted: FitReport, also_match: dict | None = None) -> dict:
    """What a resume must match (as JSON keeps it): cfg (a TrainConfig) but
    MAY_CHANGE_ON_RESUME, max_length as resolved (None and the limit it stands for are one
    run), the data's fingerprint, and `also_match`. train.run adds the process count."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in MAY_CHANGE_ON_RESUME}
    settings.update(max_length=fitted.max_length, data=data_fingerprint(fitted.samples),
                    **(also_match or {}))
    return json.loads(json.dumps(settings))


def data_fingerprint(items: Sequence) -> dict:
    """The training items' (samples' or pairs') count and a digest of their ids, text and image
    file names, in order. File names, not paths: a data set moved to another folder (another
    node's mount) between a run and its resume is still the same data."""
    h = hashlib.sha256()
    for item in items:
        row = {f.name: getattr(item, f.name) for f in fields(item)}
        row = {k: v.name if isinstance(v, Path) else v for k, v in row.items()}
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return {"samples": len(items), "sha256": h.hexdigest()}


def check_resume(work: Path, settings: dict) -> None:
    """Refuse to resume the checkpoints in `work` under settings other than the ones they were
    made with (saved there when the run started), naming each difference as old -> new."""
    path = work / RESUME_SETTINGS
    if not path.is_file():  # checkpoints from an edgevlm that did not save its settings
        log.warning("%s has no %s, so this run's settings cannot be compared with the "
                    "checkpointed run's; resuming as asked", work, RESUME_SETTINGS)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {path} cannot be read ({e}); drop --resume to start "
                        "over") from e
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} is not a settings object; drop --resume to start "
                        "over")
    diff = [f"{_setting_name(k)} {_shown(saved.get(k))} -> {_shown(settings.get(k))}"
            for k in sorted(saved.keys() | settings.keys()) if saved.get(k) != settings.get(k)]
    if diff:
        raise UserError(f"--resume: the checkpoints in {work} were made with other settings "
                        f"({'; '.join(diff)}), so this would be another run, not a resume; "
                        "drop --resume to start over, or rerun with the saved settings")


def _setting_name(key: str) -> str:
    """A setting as the user gave it: the option's name (--batch-size), or what it stands for."""
    names = {"data": "training data", "processes": "processes"}
    return names.get(key, "--" + key.replace("_", "-"))


def _shown(value) -> str:
    if isinstance(value, dict) and "samples" in value:  # a data fingerprint
        return f"{value['samples']} samples, sha256 {str(value.get('sha256'))[:12]}"
    return "(unset)" if value is None else str(value)


def load_checkpoint(accel, model, ckpt: Path) -> int:
    """Load `ckpt` into the prepared objects; the step it was saved at. A checkpoint that does
    not fit them (made for another stage or model, or damaged) is one line."""
    from safetensors import SafetensorError

    try:
        accel.load_state(str(ckpt), strict=_strict_load(model, ckpt))
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (ValueError, RuntimeError, KeyError, TypeError, OSError, EOFError,
            SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--resume: checkpoint {ckpt} does not fit this run ({reason}); drop "
                        "--resume to start over, or rerun with the settings it was made "
                        "with") from e


def _strict_load(model, ckpt: Path) -> bool:
    """Whether loading `ckpt` must find each of the model's tensors: not when the only ones it
    lacks hold no values. accelerate saves no zero-element tensor (it takes it for storage
    shared with another) and an upcycled MoE's empty shared expert is one, so without this its
    sparse and pref stages could not resume."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():  # FSDP's sharded state: accelerate's own loader checks it
        return True
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        saved = set(f.keys())
    state = model.state_dict()
    missing = [k for k in state if k not in saved]
    return not missing or bool(saved - state.keys()) or any(state[k].numel() for k in missing)


def checkpoint_due(accel, step: int, cfg, since_saved: float) -> bool:
    """Whether to checkpoint after `step`: every cfg.save_every steps, and when
    cfg.save_every_minutes passed since the last checkpoint (or the start)."""
    import torch

    if step % cfg.save_every == 0:
        return True
    if cfg.save_every_minutes is None:
        return False
    due = since_saved >= 60 * cfg.save_every_minutes
    if accel.num_processes > 1:
        # saving is collective and each process reads its own clock: save when any one is due,
        # or the others would wait for it at the save's barrier forever
        due = float(accel.reduce(torch.tensor([float(due)], device=accel.device), "sum")) > 0
    return due


def save_checkpoint(accel, work: Path, step: int, keep: int = 2) -> None:
    ckpts = work / "checkpoints"
    tmp = ckpts / f"step_{step}.tmp"
    accel.save_state(str(tmp))
    accel.wait_for_everyone()
    if accel.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        tmp.rename(ckpts / f"step_{step}")
        done = sorted(ckpts.glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old)
    accel.wait_for_everyone()
