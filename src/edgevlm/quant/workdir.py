"""A quantization's work folder, `.OUT.work/quantize/`: what `quantize --resume` continues from.

GPTQ on a real model walks its decoder for many minutes; a kill used to lose all of it. Now:

  run.json        written when the walk starts: the run's identity (QuantConfig, model,
                  calibration inputs, dtype) and what its calibration gave (the blocks, the
                  held-out count, a digest of the batches);
  block_0003.pt   written after block 3 finishes: its Linears' integers and qparams
                  (QuantizedWeight), their report records, the block's report entry and any
                  activation clips chosen.

Every file is written to a temporary name and renamed, so a kill mid-save leaves the previous
state and a block file exists only when whole. A run resumes only from a saved run equal to it:
blocks of two different runs would make a checkpoint neither run makes.

Resuming (edgevlm.quant.api) keeps everything an uninterrupted run computes from the float
model (calibration pass, Q-VLM's GPTQ guard and vision reference) and only then puts the saved
integers into the finished blocks (`apply_block`); `calibrate.walk(done=k)` forwards the
calibration hidden states through them, so block k sees the inputs it would have seen and its
integers come out bit-identical. Like train.py's checkpoints, the folder goes when OUT is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from edgevlm.atomic import work_dir
from edgevlm.errors import UserError
from edgevlm.quant.primitives import QuantConfig, QuantizedWeight

SUBDIR = "quantize"
RUN = "run.json"


def path(out_dir: str | Path) -> Path:
    return work_dir(out_dir) / SUBDIR


@dataclass
class SavedBlock:
    """One finished block, as a resumed run puts it back."""

    layers: list[int]
    weights: dict[str, QuantizedWeight]
    records: dict[str, dict]  # Linear name -> its record in quant_report.json "layers"
    info: dict  # the block's entry in quant_report.json "block_search"
    act: dict[str, tuple[float, dict]]  # Linear name -> (activation clip, errors per clip)


def identity(cfg: QuantConfig, model_dir, calib, calib_text, image_root, dtype) -> dict:
    """What a saved run must equal to be resumed, as it reads back from JSON."""
    def where(p):
        return None if p is None else str(Path(p).resolve())

    return json.loads(json.dumps({
        "config": cfg.to_dict(), "model": where(model_dir), "calib": where(calib),
        "calib_text": where(calib_text), "image_root": where(image_root),
        "dtype": str(dtype).removeprefix("torch.")}))


def digest(batches: list[dict]) -> str:
    """sha256 of the calibration batches' tensors (ids, masks, pixels, labels): the same files
    under the same names may hold other data by now."""
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            v = batch[key]
            if isinstance(v, torch.Tensor):
                h.update(f"{key} {tuple(v.shape)} {v.dtype}".encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            else:
                h.update(f"{key} {v!r}".encode())
    return h.hexdigest()


def _write(target: Path, write) -> None:
    """`write(tmp)` then rename onto `target`: a kill leaves the old file or none, never half."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, target)


def _differences(saved: dict, now: dict) -> list[str]:
    """"field (saved X, now Y)" for each field of `identity` (QuantConfig's flattened in, its
    method configs' as gptq.percdamp, qvlm.max_block, ...)."""
    def flat(run: dict) -> dict:
        cfg = run.get("config", {})
        knobs = {f"{key}.{k}": v for key, own in cfg.items() if isinstance(own, dict)
                 for k, v in own.items()}
        return {**{k: v for k, v in cfg.items() if not isinstance(v, dict)}, **knobs,
                **{k: v for k, v in run.items() if k != "config"}}

    was, now = flat(saved), flat(now)
    return [f"{k} (saved {was.get(k)!r}, now {v!r})" for k, v in now.items() if was.get(k) != v]


def clear(out_dir: str | Path) -> None:
    """Remove the saved state (and `.OUT.work` when nothing else is left in it)."""
    shutil.rmtree(path(out_dir), ignore_errors=True)
    parent = work_dir(out_dir)
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def open_run(out_dir: str | Path, run: dict, resume: bool) -> dict | None:
    """The saved run to continue (its run.json), checked against `run` (`identity`); without
    `resume`, None and a stale folder of an earlier run is cleared."""
    folder = path(out_dir)
    if not resume:
        clear(out_dir)
        return None
    if not (folder / RUN).is_file():
        raise UserError(f"--resume: nothing saved in {folder} (no run into {out_dir} reached "
                        "the calibration walk, or it finished); run without --resume to start "
                        "from scratch")
    saved = json.loads((folder / RUN).read_text())
    diff = _differences(saved["identity"], run)
    if diff:
        raise UserError(f"--resume: the run saved in {folder} differs in {'; '.join(diff)}; "
                        "resume with the same options, or drop --resume to start over")
    return saved


def calibrated(out_dir: str | Path, run: dict, saved: dict | None, calibration: dict) -> None:
    """After the calibration pass: a fresh run (`saved` None) writes run.json with its identity
    and `calibration` (blocks, held-out count, batch digest); a resumed one checks that its
    calibration is the saved one."""
    folder = path(out_dir)
    if saved is None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"identity": run, "calibration": calibration}, indent=1)
        _write(folder / RUN, lambda tmp: tmp.write_text(text))
        return
    was, now = saved["calibration"], json.loads(json.dumps(calibration))
    diff = [k for k in now if was.get(k) != now[k]]
    if diff:
        raise UserError(f"--resume: the calibration differs from the run saved in {folder} "
                        f"({', '.join(diff)}: the data files changed since); drop --resume to "
                        "start over")


def block_file(out_dir: str | Path, k: int) -> Path:
    return path(out_dir) / f"block_{k:04d}.pt"


def save_block(out_dir: str | Path, k: int, block: SavedBlock) -> None:
    """Block k of the walk, finished: written whole or not at all."""
    state = {"layers": list(block.layers),
             "weights": {n: {"q": qw.q.cpu(), "scale": qw.scale.cpu(),
                             "zero_point": qw.zero_point.cpu(), "bits": qw.bits,
                             "group_size": qw.group_size} for n, qw in block.weights.items()},
             "json": json.dumps({"records": block.records, "info": block.info,
                                 "act": block.act})}
    _write(block_file(out_dir, k), lambda tmp: torch.save(state, tmp))


def load_blocks(out_dir: str | Path, blocks: list[list[int]]) -> list[SavedBlock]:
    """The finished blocks saved for this walk, in order, up to the first one missing."""
    out = []
    for k, layers in enumerate(blocks):
        f = block_file(out_dir, k)
        if not f.is_file():
            break
        state = torch.load(f, weights_only=True)
        assert state["layers"] == layers, f"{f} holds layers {state['layers']}, not {layers}"
        rest = json.loads(state["json"])
        weights = {n: QuantizedWeight(w["q"], w["scale"], w["zero_point"], w["bits"],
                                      w["group_size"]) for n, w in state["weights"].items()}
        act = {n: (clip, errors) for n, (clip, errors) in rest["act"].items()}
        out.append(SavedBlock(layers, weights, rest["records"], rest["info"], act))
    return out


def apply_block(model, block: SavedBlock, act_bits: int, hooks) -> None:
    """Put a saved block back into the float model: its weights as their exact dequantized
    values (as the methods leave them) and its activation quantizers on `hooks`
    (edgevlm.quant.act.ActHooks)."""
    from edgevlm.quant.act import ActQuantSpec

    modules = dict(model.named_modules())
    for name, qw in block.weights.items():
        m = modules[name]
        m.weight.data = qw.dequantize().to(m.weight.device, m.weight.dtype)
    if block.act:
        hooks.install(modules, ActQuantSpec(act_bits, {n: c for n, (c, _) in block.act.items()}))
