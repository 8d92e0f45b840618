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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from edgevlm.errors import UserError
from edgevlm.families import family_of, part
from edgevlm.families.backbones import is_moe
from edgevlm.models.moe import linearize
from edgevlm.quant import act, qvlm, rtn
from edgevlm.quant.blocks import GptqGuard, layerwise_block, qvlm_block, with_act_search
from edgevlm.quant.calib_data import CalibrationData, calibration_batches
from edgevlm.quant.calibrate import BlockResult, decoder_layers, linears, prepare, walk
from edgevlm.quant.checkpoint import read_scheme, storable_group_size
from edgevlm.quant.methods import METHODS
from edgevlm.quant.primitives import MIN_GROUP, QuantConfig, QuantizedWeight, name_ends

log = logging.getLogger(__name__)


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


class _Run:
    """One quantization in progress: the model, the Linears it quantizes, and what the method
    has chosen so far (weights, per-layer records, per-block decisions, activation clips)."""

    def __init__(self, loaded, cfg: QuantConfig, device: str, quiet: bool):
        self.model, self.device, self.quiet = loaded.model, device, quiet
        self.method = METHODS[cfg.method]
        # an MoE decoder's fused experts become one Linear per expert projection, each
        # calibrated on the tokens the router sends it (edgevlm.models.moe.linear_experts)
        self.moe_layers = linearize(self.model) if is_moe(self.model.config.text_config) else 0
        self.targets = _targets(self.model, cfg)
        self.weights: dict[str, QuantizedWeight] = {}
        self.layers: dict[str, dict] = {}
        self.blocks: list[list[int]] = []
        self.block_info: list[dict] = []
        self.act_found: dict[str, tuple[float, dict]] = {}
        self.report: dict = {"config": cfg.to_dict(), "resumed_blocks": 0, "skipped": sorted(
            n for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n not in self.targets)}
        fused_note = _split_fused(self.targets, cfg)
        if fused_note:
            log.warning("%s", fused_note)
            self.report["layer_bits_note"] = fused_note
        stored, group_note = storable_group_size(
            {n: m.in_features for n, m in self.targets.items()}, cfg.group_size)
        if group_note:  # the methods search the integers the checkpoint will hold
            log.warning("%s", group_note)
            self.report.update(group_size_requested=cfg.group_size, group_size_note=group_note)
            cfg = replace(cfg, group_size=stored)
        self.cfg = cfg

    def _round(self, name: str, m: torch.nn.Linear) -> None:
        """Round one Linear to nearest (data-free)."""
        qw = rtn.quantize_weight(m.weight.detach().float(), self.cfg.for_layer(name))
        m.weight.data = qw.dequantize().to(m.weight.dtype)
        self.weights[name] = qw

    def round_data_free(self) -> None:
        """RTN without calibration data (W8A8 keeps clip 1: nothing to search)."""
        family = family_of(self.model)
        for name, m in self.targets.items():
            self._round(name, m)
            if self.cfg.act_bits != 16 and not family.owns(name, "vision_tower"):
                self.act_found[name] = (1.0, {})

    def search(self, calib_read: CalibrationData, calib, out_dir: Path, run_id: dict,
               saved_run) -> None:
        """The calibrated walk over the decoder, block by block, then the vision side."""
        from edgevlm.progress import note
        from edgevlm.quant import workdir

        cfg, model, batches = self.cfg, self.model, calib_read.batches
        vision_ref = None
        if self.method.joint_blocks and cfg.qvlm.vision_opt and calib is None:
            self.report["vision_opt"] = "skipped: no image calibration (--calib)"
        elif self.method.joint_blocks and cfg.qvlm.vision_opt:  # the float answers it will aim at
            vision_ref = qvlm.vision_reference(model, batches, calib_read.heldout)
        note(f"calibration: a float pass over {len(batches)} batch(es) ...",
             enabled=not self.quiet)
        with torch.no_grad():
            calib_data = prepare(model, batches, calib_read.heldout)
        self.blocks = (qvlm.blocks(calib_data.input_entropy, cfg.qvlm.max_block,
                                   cfg.qvlm.partition) if self.method.joint_blocks
                       else [[i] for i in range(len(decoder_layers(model)))])
        workdir.calibrated(out_dir, run_id, saved_run, {
            "blocks": self.blocks, "heldout": calib_read.heldout,
            "digest": workdir.digest(batches)})
        hooks = act.ActHooks()
        fn = (qvlm_block if self.method.joint_blocks else layerwise_block)(model, cfg,
                                                                           self.weights)
        if cfg.act_bits != 16:
            fn = with_act_search(fn, model, cfg, self.act_found, hooks)
        # from the float model, before any saved block is put back
        guard = (GptqGuard(model, self.targets, batches, calib_read.heldout)
                 if self.method.gptq_guard and cfg.act_bits == 16 else None)
        self._walk(calib_data, fn, hooks, out_dir, saved_run)
        if guard is not None:
            self.report["gptq_guard"] = guard.settle(self.weights, self.blocks, self.block_info,
                                                     cfg, self.device, calib_data, self.quiet)
        self.report["calibration"] = {"samples": calib_data.samples, "file": str(calib),
                                      **calib_read.report,
                                      "layer_input_entropy": calib_data.input_entropy}
        if cfg.quantize_vision:
            family = family_of(model)
            for name, m in self.targets.items():
                if family.owns(name, "vision_tower"):
                    self._round(name, m)
            self.report["vision_tower"] = "rtn (data-free)"
        if vision_ref is not None:  # against the quantized model as it will ship
            self.report["vision_opt"] = qvlm.optimize_vision(model, vision_ref, cfg)

    def _walk(self, calib_data, fn, hooks, out_dir: Path, saved_run) -> None:
        """Put back the blocks a killed run finished, then search the rest, saving each one in
        the work folder as it finishes."""
        from edgevlm.progress import Progress, note
        from edgevlm.quant import workdir

        cfg = self.cfg
        done = workdir.load_blocks(out_dir, self.blocks) if saved_run is not None else []
        for saved in done:
            workdir.apply_block(self.model, saved, cfg.act_bits, hooks)
            self.weights.update(saved.weights)
            self.layers.update(saved.records)
            self.block_info.append(saved.info)
            self.act_found.update(saved.act)
        self.report["resumed_blocks"] = len(done)
        if done:
            note(f"resuming: {len(done)} of {len(self.blocks)} blocks quantized before, from "
                 f"{workdir.path(out_dir)}", enabled=not self.quiet)
        with Progress(f"quantize {cfg.method}", len(self.blocks), completed=len(done),
                      enabled=not self.quiet, unit=self.method.unit) as bar:
            def on_block(result: BlockResult, seconds: float) -> None:
                for name, rec in result.records.items():
                    self.layers[name] = {**rec,
                                         "seconds": seconds / max(len(result.records), 1)}
                self.block_info.append({**result.decision, "seconds": seconds})
                index = len(self.block_info) - 1
                workdir.save_block(out_dir, index, workdir.SavedBlock(
                    self.blocks[index], {n: self.weights[n] for n in result.records},
                    {n: self.layers[n] for n in result.records}, self.block_info[-1],
                    {n: self.act_found[n] for n in result.records if n in self.act_found}))
                bar.update(1, err=max((r["error"] for r in result.records.values()),
                                      default=0.0))

            try:
                walk(self.model, calib_data, self.blocks, fn, on_block, self.device, len(done))
            except UserError:  # NaN in a block: a resumed run would meet it again
                workdir.clear(out_dir)
                raise
            finally:
                hooks.remove()

    def finish(self, device: str, dtype: torch.dtype, seconds: float) -> dict:
        """quant_report.json of the finished run; the weights move to the CPU."""
        cfg = self.cfg
        self.weights = {n: qw.to("cpu") for n, qw in self.weights.items()}
        missing = set(self.targets) - set(self.weights)
        assert not missing, f"layers left unquantized: {sorted(missing)[:3]}"
        errors = [r["error"] for r in self.layers.values()]
        if cfg.act_bits != 16:
            spec = act.ActQuantSpec(cfg.act_bits, {n: c for n, (c, _) in self.act_found.items()},
                                    {n: e for n, (_, e) in self.act_found.items()})
            self.report["activations"] = spec.to_dict()
        self.report.update({
            "device": device, "dtype": str(dtype).removeprefix("torch."),
            "method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
            "layer_bits": {n: b for n, b in cfg.layer_bits},
            "weight_bits_mean": _mean_bits(self.weights),
            "symmetric": cfg.symmetric, "act_bits": cfg.act_bits,
            "partition": cfg.qvlm.partition if self.method.joint_blocks else None,
            "blocks": self.blocks, "block_search": self.block_info,
            "layers": self.layers, "mean_error": sum(errors) / len(errors) if errors else None,
            "seconds": seconds, "layers_quantized": len(self.weights),
            "moe_layers": self.moe_layers,
            "load_note": None if cfg.symmetric else (
                "asymmetric pack-quantized: load with transformers' "
                "CompressedTensorsConfig(dequantize=True) (llm-compressor issue 1618)")})
        return self.report


def _check_start(model_dir, out_dir: Path, overwrite: bool, inputs: list, cfg: QuantConfig,
                 device: str, dtype) -> tuple[str, torch.dtype]:
    """Every check that can fail before the model loads; the device and dtype the run uses."""
    from edgevlm.atomic import check_new
    from edgevlm.devices import checkpoint_dtype, resolve_device
    from edgevlm.models import read_config

    check_new(out_dir, overwrite, inputs)
    read_config(model_dir)  # a model folder, or its own error
    if read_scheme(model_dir) is not None:
        raise UserError(f"{model_dir} is already quantized (quantization_config in config.json); "
                        "quantize the float model it was made from")
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    if dtype is None:
        dtype = checkpoint_dtype(model_dir) if device == "cuda" else torch.float32
    return device, dtype


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
    from edgevlm.atomic import atomic_dir
    from edgevlm.models import load_model
    from edgevlm.progress import note
    from edgevlm.quant import workdir
    from edgevlm.quant.writer import write_checkpoint

    t0 = time.time()
    out_dir = Path(out_dir)
    inputs = [model_dir, calib, calib_text]
    device, dtype = _check_start(model_dir, out_dir, overwrite, inputs, cfg, device, dtype)
    run_id = workdir.identity(cfg, model_dir, calib, calib_text, image_root, dtype)
    saved_run = workdir.open_run(out_dir, run_id, resume)  # before minutes of loading
    note(f"loading model {model_dir} ...", enabled=not quiet)
    loaded = load_model(model_dir, dtype=dtype)
    run = _Run(loaded, cfg, device, quiet)
    cfg = run.cfg  # with the group size the checkpoint can store
    if (run.method.needs_calib or cfg.act_bits in act.SEARCHED_BITS or calib is not None
            or calib_text is not None):
        calib_read = calibration_batches(loaded, calib, cfg, image_root, calib_text)
        run.search(calib_read, calib, out_dir, run_id, saved_run)
    else:
        run.round_data_free()
    report = run.finish(device, dtype, time.time() - t0)
    with atomic_dir(out_dir, overwrite, inputs) as tmp:
        write_checkpoint(loaded, run.weights, tmp, cfg.bits, cfg.group_size, cfg.symmetric,
                         report, cfg.layer_bits)
    workdir.clear(out_dir)  # OUT is whole: nothing left to resume
    return QuantResult(out_dir, cfg.method, len(run.weights), report["seconds"],
                       report["mean_error"], run.blocks, report, run.weights)
