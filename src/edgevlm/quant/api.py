"""`quantize(model_dir, out_dir, QuantConfig)`: the quantize stage as one verb.

Loads the model, checks every input that could fail late (OUT, an already-quantized model, group
sizes, calibration data), walks the decoder with `calibrate.walk` using the method's block
function (edgevlm.quant.blocks; for Q-VLM then its GPTQ guard), and writes a
compressed-tensors checkpoint plus quant_report.json atomically.
With `quantize_vision`, the vision tower's Linears are rounded to nearest (data-free; calibrated
vision quantization is not implemented yet) and the report says so.
With `act_bits` < 16 the decoder Linears' inputs are quantized too (edgevlm.quant.act): the weights
are written as always, the activation quantizers (bits, clip per Linear) go to quant_report.json
under "activations", and `edgevlm eval` puts them back on the loaded model.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from edgevlm.errors import UserError
from edgevlm.families import family_of, part
from edgevlm.moe import is_moe, linearize
from edgevlm.quant import act, qvlm, rtn
from edgevlm.quant.blocks import GptqGuard, layerwise_block, qvlm_block, with_act_search
from edgevlm.quant.calibrate import (
    BlockResult,
    decoder_layers,
    linears,
    prepare,
    walk,
)
from edgevlm.quant.checkpoint import read_scheme, storable_group_size
from edgevlm.quant.primitives import (
    MIN_CALIB_SAMPLES,
    MIN_GROUP,
    QuantConfig,
    QuantizedWeight,
    name_ends,
)

log = logging.getLogger(__name__)

NEEDS_CALIB = ("gptq", "qvlm")


@dataclass(frozen=True)
class QuantResult:
    out_dir: Path
    method: str
    layers_quantized: int
    seconds: float
    mean_error: float | None  # mean relative output error ‖WX − ŴX‖/‖WX‖ over Linears
    blocks: list[list[int]]
    report: dict
    weights: dict[str, QuantizedWeight] = field(repr=False, default_factory=dict)


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


def _calibration_batches(loaded, calib: Path | None, cfg: QuantConfig, image_root,
                         calib_text: Path | None = None) -> CalibrationData:
    if calib is None and calib_text is None:
        what = (f"--method {cfg.method}" if cfg.method in NEEDS_CALIB
                else f"--act-bits {cfg.act_bits} (its clipping search)")
        raise UserError(f"{what} needs calibration data: pass --calib DATA.json "
                        "(LLaVA format, image + text) and/or --calib-text FILE (plain text)")
    alone = calib is None and cfg.method == "qvlm"  # text alone: Q-VLM holds out text windows
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
               if cfg.method == "qvlm" else "")
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
    n_held = _heldout_count(len(fit.samples)) if cfg.method == "qvlm" else 0
    if n_held:
        report["heldout_samples"] = n_held
    batches, n_held_batches = _fit_then_heldout(fit.samples, n_held, cfg.batch_size, collate)
    return CalibrationData(batches, report, n_held_batches)


def _targets(model, cfg: QuantConfig) -> dict[str, torch.nn.Linear]:
    family = family_of(model)
    out = linears(part(model, "language_model"), family.path("language_model"), cfg.skip)
    if cfg.quantize_vision:
        out.update(linears(part(model, "vision_tower"), family.path("vision_tower"), cfg.skip))
    # A group size that does not divide a width is fine (storable_group_size); one wider than a
    # layer would make the whole row one ragged group, which is --group-size -1 said unclearly.
    for name, m in out.items():
        k = m.in_features
        if cfg.group_size > k:
            fit = 1 << (k.bit_length() - 1)
            smaller = f" or --group-size {fit}" if fit >= MIN_GROUP else ""
            raise UserError(f"--group-size {cfg.group_size} is larger than the input width {k} "
                            f"of {name}; choose --group-size -1 (one group per row){smaller}")
    for end, bits in cfg.layer_bits:
        if not any(name_ends(n, end) for n in out):
            ends = sorted({n.rsplit(".", 1)[-1] for n in out})
            raise UserError(f"--layer-bits {end}={bits} names no quantized Linear; their names "
                            f"end with {', '.join(ends)}")
    return out


# Linears that vLLM (qkv_proj, gate_up_proj) and edgevlm's export (one MatMulNBits for q, k, v)
# fuse into one, which then needs one scheme for all of them
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _split_fused(names, cfg: QuantConfig) -> str | None:
    """Why --layer-bits will keep the checkpoint out of vLLM, or None when it does not."""
    for group in FUSED:
        for name in names:
            head, _, last = name.rpartition(".")
            if last == group[0]:
                bits = {s: cfg.bits_for(f"{head}.{s}") for s in group}
                if len(set(bits.values())) > 1:
                    return (f"--layer-bits gives {', '.join(f'{s} {b}' for s, b in bits.items())}"
                            f" bits in {head}; vLLM fuses {' + '.join(group)} into one layer "
                            "with one scheme and refuses such a checkpoint (give them the same "
                            "bits to serve it there); transformers loads it")
    return None


def _mean_bits(weights: dict[str, QuantizedWeight]) -> float:
    """Integer bits per quantized weight, over every quantized Linear (scales not counted)."""
    total = sum(qw.q.numel() for qw in weights.values())
    return sum(qw.q.numel() * qw.bits for qw in weights.values()) / max(total, 1)


def quantize(model_dir: str | Path, out_dir: str | Path, cfg: QuantConfig,
             calib: str | Path | None = None, image_root: str | Path | None = None,
             overwrite: bool = False, quiet: bool = True, device: str = "auto",
             dtype: torch.dtype | None = None,
             calib_text: str | Path | None = None, resume: bool = False) -> QuantResult:
    """Quantize a LLaVA-family model directory into a compressed-tensors checkpoint.

    device: where the decoder blocks are searched ("auto": CUDA when torch sees it); the model
    stays on the CPU and one block at a time goes to the device. dtype: the weights' dtype while
    quantizing (default: the checkpoint's own on CUDA, float32 on the CPU, where bf16 matmuls
    are slow); the algorithms do their arithmetic in float32/float64 whatever it is.
    Each finished block of the calibration walk is saved in `.OUT.work/quantize/`
    (edgevlm.quant.workdir); `resume` continues a killed run with the same arguments from its
    first unfinished block, to the same integers; without it, a stale folder is cleared."""
    from edgevlm.atomic import atomic_dir, check_new
    from edgevlm.devices import checkpoint_dtype, resolve_device
    from edgevlm.models import load_model, read_config
    from edgevlm.progress import Progress, note
    from edgevlm.quant import workdir
    from edgevlm.quant.checkpoint import write_checkpoint

    t0 = time.time()
    out_dir = Path(out_dir)
    inputs = [model_dir, calib, calib_text]
    check_new(out_dir, overwrite, inputs)
    read_config(model_dir)  # a LLaVA model folder, or its own error
    if read_scheme(model_dir) is not None:
        raise UserError(f"{model_dir} is already quantized (quantization_config in config.json); "
                        "quantize the float model it was made from")
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    if dtype is None:
        dtype = checkpoint_dtype(model_dir) if device == "cuda" else torch.float32
    run = workdir.identity(cfg, model_dir, calib, calib_text, image_root, dtype)
    saved_run = workdir.open_run(out_dir, run, resume)  # before minutes of loading
    note(f"loading model {model_dir} ...", enabled=not quiet)
    loaded = load_model(model_dir, dtype=dtype)
    model = loaded.model
    # an MoE decoder's fused experts become one Linear per expert projection, each calibrated
    # on the tokens the router sends it (edgevlm.moe.linear_experts)
    moe_layers = linearize(model) if is_moe(model.config.text_config) else 0
    targets = _targets(model, cfg)
    weights: dict[str, QuantizedWeight] = {}
    report: dict = {"config": cfg.to_dict(), "resumed_blocks": 0, "skipped": sorted(
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n not in targets)}
    fused_note = _split_fused(targets, cfg)
    if fused_note:
        log.warning("%s", fused_note)
        report["layer_bits_note"] = fused_note
    stored, group_note = storable_group_size({n: m.in_features for n, m in targets.items()},
                                       cfg.group_size)
    if group_note:  # the methods search the integers the checkpoint will hold
        log.warning("%s", group_note)
        report.update(group_size_requested=cfg.group_size, group_size_note=group_note)
        cfg = replace(cfg, group_size=stored)

    needs = cfg.method in NEEDS_CALIB or cfg.act_bits in act.SEARCHED_BITS
    calib_read = _calibration_batches(loaded, calib, cfg, image_root, calib_text) if (
        needs or calib is not None or calib_text is not None) else None
    batches = calib_read.batches if calib_read is not None else None
    act_found: dict[str, tuple[float, dict]] = {}
    hooks = act.ActHooks()
    if batches is None:
        for name, m in targets.items():  # data-free RTN (W8A8 keeps clip 1: nothing to search)
            qw = rtn.quantize_weight(m.weight.detach().float(), cfg.for_layer(name))
            m.weight.data = qw.dequantize().to(m.weight.dtype)
            weights[name] = qw
            if cfg.act_bits != 16 and not family_of(model).owns(name, "vision_tower"):
                act_found[name] = (1.0, {})
        layers, blocks, block_info = {}, [], []
    else:
        vision_ref = None
        if cfg.method == "qvlm" and cfg.vision_opt and calib is None:
            report["vision_opt"] = "skipped: no image calibration (--calib)"
        elif cfg.method == "qvlm" and cfg.vision_opt:  # the float answers it will aim at
            vision_ref = qvlm.vision_reference(model, batches, calib_read.heldout)
        note(f"calibration: a float pass over {len(batches)} batch(es) ...", enabled=not quiet)
        with torch.no_grad():
            calib_data = prepare(model, batches, calib_read.heldout)
        n_layers = len(decoder_layers(model))
        blocks = (qvlm.blocks(calib_data.input_entropy, cfg.max_block, cfg.partition)
                  if cfg.method == "qvlm" else [[i] for i in range(n_layers)])
        workdir.calibrated(out_dir, run, saved_run, {
            "blocks": blocks, "heldout": calib_read.heldout, "digest": workdir.digest(batches)})
        fn = (qvlm_block if cfg.method == "qvlm" else layerwise_block)(model, cfg, weights)
        if cfg.act_bits != 16:
            fn = with_act_search(fn, model, cfg, act_found, hooks)
        # from the float model, before any saved block is put back
        guard = (GptqGuard(model, targets, batches, calib_read.heldout)
                 if cfg.method == "qvlm" and cfg.act_bits == 16 else None)
        layers, block_info = {}, []
        done = workdir.load_blocks(out_dir, blocks) if saved_run is not None else []
        for saved in done:
            workdir.apply_block(model, saved, cfg.act_bits, hooks)
            weights.update(saved.weights)
            layers.update(saved.records)
            block_info.append(saved.info)
            act_found.update(saved.act)
        report["resumed_blocks"] = len(done)
        if done:
            note(f"resuming: {len(done)} of {len(blocks)} blocks quantized before, from "
                 f"{workdir.path(out_dir)}", enabled=not quiet)
        unit = "blocks" if cfg.method == "qvlm" else "layers"
        with Progress(f"quantize {cfg.method}", len(blocks), completed=len(done),
                      enabled=not quiet, unit=unit) as bar:
            def on_block(result: BlockResult, seconds: float) -> None:
                for name, rec in result.records.items():
                    layers[name] = {**rec, "seconds": seconds / max(len(result.records), 1)}
                block_info.append({**result.decision, "seconds": seconds})
                workdir.save_block(out_dir, len(block_info) - 1, workdir.SavedBlock(
                    blocks[len(block_info) - 1], {n: weights[n] for n in result.records},
                    {n: layers[n] for n in result.records}, block_info[-1],
                    {n: act_found[n] for n in result.records if n in act_found}))
                bar.update(1, err=max((r["error"] for r in result.records.values()),
                                      default=0.0))

            try:
                walk(model, calib_data, blocks, fn, on_block, device, len(done))
            except UserError:  # NaN in a block: a resumed run would meet it again
                workdir.clear(out_dir)
                raise
            finally:
                hooks.remove()
        if guard is not None:
            report["gptq_guard"] = guard.settle(weights, blocks, block_info, cfg, device,
                                                calib_data, quiet)
        report["calibration"] = {"samples": calib_data.samples, "file": str(calib),
                                 **calib_read.report,
                                 "layer_input_entropy": calib_data.input_entropy}
        if cfg.quantize_vision:
            for name, m in targets.items():
                if family_of(model).owns(name, "vision_tower"):
                    qw = rtn.quantize_weight(m.weight.detach().float(), cfg.for_layer(name))
                    m.weight.data = qw.dequantize().to(m.weight.dtype)
                    weights[name] = qw
            report["vision_tower"] = "rtn (data-free)"
        if vision_ref is not None:  # against the quantized model as it will ship
            report["vision_opt"] = qvlm.optimize_vision(model, vision_ref, cfg)
    weights = {n: qw.to("cpu") for n, qw in weights.items()}
    missing = set(targets) - set(weights)
    assert not missing, f"layers left unquantized: {sorted(missing)[:3]}"
    errors = [r["error"] for r in layers.values()]
    if cfg.act_bits != 16:
        spec = act.ActQuantSpec(cfg.act_bits, {n: c for n, (c, _) in act_found.items()},
                                {n: e for n, (_, e) in act_found.items()})
        report["activations"] = spec.to_dict()
    seconds = time.time() - t0
    report.update({"device": device, "dtype": str(dtype).removeprefix("torch."),
                   "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
                   "layer_bits": {n: b for n, b in cfg.layer_bits},
                   "weight_bits_mean": _mean_bits(weights),
                   "symmetric": cfg.symmetric, "act_bits": cfg.act_bits,
                   "partition": cfg.partition if cfg.method == "qvlm" else None,
                   "blocks": blocks, "block_search": block_info,
                   "layers": layers, "mean_error": sum(errors) / len(errors) if errors else None,
                   "seconds": seconds, "layers_quantized": len(weights),
                   "moe_layers": moe_layers,
                   "load_note": None if cfg.symmetric else (
                       "asymmetric pack-quantized: load with transformers' "
                       "CompressedTensorsConfig(dequantize=True) (llm-compressor issue 1618)")})
    with atomic_dir(out_dir, overwrite, inputs) as tmp:
        write_checkpoint(loaded, weights, tmp, cfg.bits, cfg.group_size, cfg.symmetric, report,
                         cfg.layer_bits)
    workdir.clear(out_dir)  # OUT is whole: nothing left to resume
    return QuantResult(out_dir, cfg.method, len(weights), seconds, report["mean_error"], blocks,
                       report, weights)
