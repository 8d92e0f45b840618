"""`edgevlm quantize`: RTN, GPTQ and Q-VLM into a compressed-tensors checkpoint.

Kept apart from edgevlm.cli (one option per QuantConfig field makes it long); edgevlm.cli
registers it on the app.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from edgevlm.cli.common import (
    IMAGE_ROOT_HELP,
    JsonOpt,
    QuietOpt,
    SeedOpt,
    quiet_libraries,
    show_next,
    summary,
)
from edgevlm.cli.next_steps import after_quantize
from edgevlm.errors import UserError


def quantize_(
    model: Path = typer.Argument(..., help="Float model folder"),
    out: Path = typer.Option(..., help="Quantized model folder to create"),
    method: str = typer.Option("qvlm", help="qvlm | gptq | rtn"),
    bits: int = typer.Option(4, help="Weight bits, 2..8"),
    group_size: int = typer.Option(128, help="Power of two >= 16 (32 | 64 | 128 ...), or -1 for "
                                   "one group per row; where it does not divide every width "
                                   "the checkpoint holds the largest that does (see "
                                   "quant_report.json)"),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="Symmetric integers "
                                   "(no zero point; the default, as llm-compressor's W4A16, "
                                   "which transformers loads with a plain from_pretrained) or "
                                   "a zero point per group (loads with "
                                   "CompressedTensorsConfig(dequantize=True))"),
    scale_rule: Optional[str] = typer.Option(None, help="Symmetric scales: signed (llama.cpp "
                                             "Q4_0: the extreme weight exactly on -2^(b-1); "
                                             "2-4 bits; the default there) or absmax (step "
                                             "2·max|w|/(2^b-1); the default at 5-8 bits)"),
    layer_bits: Optional[str] = typer.Option(None, help="Mixed precision: NAME=BITS,... "
                                             "quantizes the Linears whose names end with NAME "
                                             "at BITS, the rest at --bits (e.g. v_proj=8; "
                                             "docs/quantize.md)"),
    act_bits: int = typer.Option(16, help="16 = weight-only; 8 = W8A8 (onnxruntime int8); "
                                 "6 / 4 = simulated, clipping searched"),
    calib: Optional[Path] = typer.Option(None, help="Calibration data (LLaVA-format JSON)"),
    calib_text: Optional[Path] = typer.Option(None, help="Plain-text calibration for the "
                                              "language model (windows of 512 tokens from the "
                                              "file's end), alone or beside --calib"),
    calib_samples: int = typer.Option(128, help="Image samples of --calib, and windows of "
                                      "--calib-text"),
    max_block: int = typer.Option(4, help="Q-VLM: most decoder layers searched jointly"),
    partition: str = typer.Option("entropy", help="Q-VLM blocks: entropy | uniform (same count)"),
    vision_opt: bool = typer.Option(False, "--vision-opt/--no-vision-opt",
                                    help="Q-VLM: after the search, tune the projector and the "
                                    "tower's final norms against the quantized decoder, kept "
                                    "only as far as held-out calibration samples confirm (off "
                                    "by default; docs/quantize.md)"),
    quantize_vision: bool = typer.Option(False, "--quantize-vision"),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: act-order"),
    seed: SeedOpt = 0,
    device: str = typer.Option("auto", help="auto | cpu | cuda: where each decoder block is "
                               "searched (the model stays on the CPU; auto: CUDA when torch "
                               "sees it)"),
    image_root: Optional[Path] = typer.Option(None, help=IMAGE_ROOT_HELP),
    overwrite: bool = typer.Option(False),
    resume: bool = typer.Option(False, help="Continue a killed run into the same --out with "
                                "the same options: its finished decoder blocks (saved in "
                                ".OUT.work/quantize/ after each one) are put back and the walk "
                                "goes on from the first unfinished one, to the integers an "
                                "uninterrupted run gives. Refused when the options or "
                                "calibration data differ; without --resume a saved run is "
                                "discarded"),
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Post-training quantization into a compressed-tensors checkpoint (+ quant_report.json)."""
    quiet_libraries()
    from edgevlm.quant import GptqConfig, QuantConfig, QvlmConfig, quantize

    cfg = QuantConfig(method=method, bits=bits, group_size=group_size, symmetric=symmetric,
                      scale_rule=scale_rule, layer_bits=parse_layer_bits(layer_bits),
                      act_bits=act_bits, calib_samples=calib_samples,
                      quantize_vision=quantize_vision, seed=seed,
                      gptq=GptqConfig(act_order=act_order),
                      qvlm=QvlmConfig(max_block=max_block, partition=partition,
                                      vision_opt=vision_opt))
    r = quantize(model, out, cfg, calib=calib, image_root=image_root, overwrite=overwrite,
                 quiet=quiet or as_json, device=device, calib_text=calib_text, resume=resume)
    summary("quantize", {"out": r.out_dir, "method": r.method, "device": r.report["device"],
                          "bits": bits, "layer_bits": r.report["layer_bits"] or None,
                          "weight_bits_mean": r.report["weight_bits_mean"],
                          "group_size": r.report["group_size"], "layers": r.layers_quantized,
                          "blocks": r.blocks, "resumed blocks": r.report["resumed_blocks"],
                          "mean_error": r.mean_error,
                          "seconds": r.seconds}, quiet, as_json)
    show_next(after_quantize(r.out_dir, bits, group_size, calib), quiet, as_json)


def parse_layer_bits(text: str | None) -> tuple[tuple[str, int], ...]:
    """--layer-bits "v_proj=8,mlp.down_proj=6" as ((name, bits), ...)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        name, sep, bits = item.strip().partition("=")
        if not sep or not re.fullmatch(r"[0-9]{1,3}", bits.strip()):  # ASCII digits: '²' is not
            raise UserError(f"--layer-bits {text!r}: {item.strip()!r} is not NAME=BITS; write "
                            "e.g. --layer-bits v_proj=8,down_proj=8")
        pairs.append((name.strip(), int(bits)))
    return tuple(pairs)

