"""The calibration data of `edgevlm quantize`: LLaVA samples with images (`--calib`) and/or
windows of plain text (`--calib-text`), in batches; Q-VLM's held-out part comes last, so the
walk fits on the first batches and judges its choices on the rest."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.quant.methods import METHODS
from edgevlm.quant.primitives import MIN_CALIB_SAMPLES, QuantConfig

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.25  # Q-VLM: calibration samples held out to judge its choices


@dataclass
class CalibrationData:
    batches: list[dict]
    report: dict  # what was read, left out and truncated, for quant_report.json
    heldout: int = 0  # the last this many batches hold the held-out samples


TEXT_WINDOW = 512  # tokens per calibration window of --calib-text


def _heldout_count(n: int) -> int:
    """How many of `n` calibration items Q-VLM holds out: HELDOUT_FRACTION, at least one."""
    return max(1, round(n * HELDOUT_FRACTION))


def _fit_then_heldout(items: list, n_held: int, size: int, collate) -> tuple[list[dict], int]:
    """`items` in batches of `size` (collate: items -> batch), the last `n_held` of them in
    batches of their own at the end; returns (batches, held-out batch count)."""
    def batched(part):
        return [collate(part[i: i + size]) for i in range(0, len(part), size)]

    cut = len(items) - n_held
    held = batched(items[cut:]) if n_held else []
    return batched(items[:cut]) + held, len(held)


def _text_batches(loaded, calib_text: Path, cfg: QuantConfig,
                  hold_out: bool = False) -> tuple[list[dict], dict, int]:
    """Up to `cfg.calib_samples` windows of TEXT_WINDOW tokens of plain text, taken from the
    end of the file backwards (so the text's beginning, where `edgevlm eval --text` scores,
    is the last to be used), as text-only batches: the language model's calibration without
    images, as GPTQ is calibrated on WikiText or C4. With `hold_out` (Q-VLM on text alone) the
    last HELDOUT_FRACTION of the windows (at least one) form the final, held-out batches;
    returns (batches, report, held-out batch count)."""
    import torch

    from edgevlm.perplexity import read_text

    text = read_text(calib_text)
    ids = loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(cfg.calib_samples, len(ids) // TEXT_WINDOW)
    if n < 1:
        raise UserError(f"--calib-text {calib_text} has {len(ids)} tokens, less than one "
                        f"calibration window of {TEXT_WINDOW}; give a longer text")
    wins = [ids[len(ids) - (i + 1) * TEXT_WINDOW: len(ids) - i * TEXT_WINDOW] for i in range(n)]
    n_held = _heldout_count(n) if hold_out else 0
    if hold_out and n - n_held < 1:
        raise UserError(f"--calib-text {calib_text} gives {n} window(s) of {TEXT_WINDOW} tokens; "
                        "Q-VLM fits on some and holds out at least one: give a longer text or "
                        "more --calib-samples")

    def collate(part):
        x = torch.tensor(part)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "pixel_values": None,
                "labels": torch.full_like(x, -100)}

    batches, n_held_batches = _fit_then_heldout(wins, n_held, cfg.batch_size, collate)
    report = {"text_file": str(calib_text), "text_windows": n, "text_window_tokens": TEXT_WINDOW,
              "text_tokens_used_from_end": n * TEXT_WINDOW, "text_tokens": len(ids)}
    if n_held:
        report["heldout_text_windows"] = n_held
    return batches, report, n_held_batches


def calibration_batches(loaded, calib: Path | None, cfg: QuantConfig, image_root,
                        calib_text: Path | None = None) -> CalibrationData:
    """The calibration batches of `--calib` (image + text samples) and/or `--calib-text`
    (plain-text windows), the held-out ones (Q-VLM) last."""
    if calib is None and calib_text is None:
        what = (f"--method {cfg.method}" if METHODS[cfg.method].needs_calib
                else f"--act-bits {cfg.act_bits} (its clipping search)")
        raise UserError(f"{what} needs calibration data: pass --calib DATA.json "
                        "(LLaVA format, image + text) and/or --calib-text FILE (plain text)")
    alone = calib is None and METHODS[cfg.method].holds_out  # text alone: held-out windows
    text, text_report, text_held = (_text_batches(loaded, calib_text, cfg, alone) if calib_text
                                    else ([], {}, 0))
    if calib is None:
        return CalibrationData(text, text_report, text_held)
    images = _image_batches(loaded, calib, cfg, image_root)
    n = len(images.batches)  # text batches join the fitting part, before the held-out ones
    batches = images.batches[: n - images.heldout] + text + images.batches[n - images.heldout:]
    return CalibrationData(batches, {**images.report, **text_report}, images.heldout)


def _image_batches(loaded, calib: Path, cfg: QuantConfig, image_root) -> CalibrationData:
    from edgevlm.data import Collator, fit_samples, load_samples, resolve_max_length

    read = load_samples(calib, image_root)  # every image entry must name an existing image
    # Calibration measures image + text activations (Q-VLM's vision side needs the images), so
    # LLaVA-665k's text-only conversations are left out, and counted.
    samples = [s for s in read if s.image is not None]
    if len(samples) < len(read):
        log.warning("%s: %d text-only entries left out of calibration, which needs images",
                    calib, len(read) - len(samples))
    if len(samples) < MIN_CALIB_SAMPLES:
        why = (" (Q-VLM fits on some and holds out at least one to judge its search)"
               if METHODS[cfg.method].holds_out else "")
        raise UserError(f"{calib} holds {len(samples)} sample(s) with an image; calibration "
                        f"needs at least {MIN_CALIB_SAMPLES}{why} (ask for --calib-samples "
                        f"{cfg.calib_samples})")
    if len(samples) < cfg.calib_samples:
        log.warning("%s holds %d samples, fewer than --calib-samples %d; using all of them",
                    calib, len(samples), cfg.calib_samples)
    random.Random(cfg.seed).shuffle(samples)
    samples = samples[: cfg.calib_samples]
    positions = getattr(loaded.model.config.text_config, "max_position_embeddings", None)
    collate = Collator(loaded.processor, loaded.num_image_tokens,
                       resolve_max_length(None, positions))
    fit = fit_samples(samples, collate, f"--calib {calib}")
    report = {"text_only_left_out": len(read) - sum(s.image is not None for s in read),
              "truncated": len(fit.truncated), "skipped_too_long": len(fit.skipped),
              "max_length": fit.max_length}
    # Q-VLM: at least one of the >= MIN_CALIB_SAMPLES held out, and one left to fit
    n_held = _heldout_count(len(fit.samples)) if METHODS[cfg.method].holds_out else 0
    if n_held:
        report["heldout_samples"] = n_held
    batches, n_held_batches = _fit_then_heldout(fit.samples, n_held, cfg.batch_size, collate)
    return CalibrationData(batches, report, n_held_batches)
