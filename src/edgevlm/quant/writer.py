"""Writing a quantized checkpoint in compressed-tensors' `pack-quantized` format (the format and
its reading: edgevlm.quant.checkpoint)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from edgevlm.models import save_model
from edgevlm.quant.checkpoint import REPORT
from edgevlm.quant.primitives import QuantizedWeight


def _scheme_args(bits: int, group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=group_size)


def name_target(end: str) -> str:
    """A compressed-tensors target matching every module whose name ends with `end`."""
    return r"re:(.*\.)?" + re.escape(end) + "$"


def write_checkpoint(loaded, weights: dict[str, QuantizedWeight], out_dir: Path, bits: int,
                     group_size: int, symmetric: bool, report: dict,
                     layer_bits: tuple[tuple[str, int], ...] = ()) -> None:
    """Write `loaded` (a LoadedModel whose Linears named in `weights` are quantized) into
    `out_dir` (which the caller made atomic) with `quantization_config` in config.json.

    Mixed precision (`layer_bits`, QuantConfig.layer_bits) adds a config group per other bit
    width whose targets are name patterns; compressed-tensors gives a pattern precedence over
    the class target "Linear" of the last group, as llm-compressor's mixed recipes rely on."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )


    model = loaded.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = set(weights) - set(linears)
    assert not missing, f"quantized weights for unknown modules {sorted(missing)[:3]}"
    ignore = sorted(n for n in linears if n not in weights)
    # the name-pattern groups first: compressed-tensors credits a module to the first target
    # in config order that matches it, and warns of any target it never credited
    groups = {}
    for b in sorted({b for _, b in layer_bits if b != bits}):
        groups[f"group_{len(groups)}"] = QuantizationScheme(
            targets=[name_target(end) for end, lb in layer_bits if lb == b],
            weights=_scheme_args(b, group_size, symmetric))
    groups[f"group_{len(groups)}"] = QuantizationScheme(
        targets=["Linear"], weights=_scheme_args(bits, group_size, symmetric))
    qconfig = QuantizationConfig(config_groups=groups, ignore=ignore,
                                 format="pack-quantized",
                                 quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, qconfig, show_progress=False)
    for name, qw in weights.items():
        m = linears[name]
        held = m.quantization_scheme.weights.num_bits
        assert qw.bits == held, f"{name}: {qw.bits}-bit weight where the checkpoint holds {held}"
        offset = 1 << (qw.bits - 1)
        assert group_size == -1 or (qw.group_size == group_size and not qw.ragged), \
            f"{name}: groups of {qw.group_size} over {qw.q.shape[1]} columns in a checkpoint " \
            f"of group size {group_size} (see storable_group_size)"
        with torch.no_grad():
            m.weight.data = qw.dequantize().to(m.weight.dtype)
            m.weight_scale.data = qw.scale.to(m.weight_scale.dtype).reshape(
                m.weight_scale.shape)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = (qw.zero_point - offset).to(
                    m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    # Built from our config, not ModelCompressor.from_pretrained_model: that one re-derives the
    # ignore list through LLaVA's legacy key mapping and writes names that no longer match.
    compressor = ModelCompressor(quantization_config=qconfig,
                                 force_compression_format="pack-quantized")
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    save_model(loaded, out_dir)
    compressor.update_config(str(out_dir))
    (Path(out_dir) / REPORT).write_text(json.dumps(report, indent=1, default=str) + "\n")
