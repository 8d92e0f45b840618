"""Round-to-nearest: min/max qparams per group, then round. The baseline every method beats.
A group size that does not divide K leaves a ragged last group with its own qparams."""

from __future__ import annotations

import torch

from edgevlm.quant.primitives import QuantConfig, QuantizedWeight, choose_qparams, quantize


def quantize_weight(W: torch.Tensor, cfg: QuantConfig,
                    clip: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """W (N, K) -> integers and qparams, each weight rounded to its nearest grid point."""
    qp = choose_qparams(W, cfg.bits, cfg.group_size, cfg.symmetric, clip, cfg.signed)
    return QuantizedWeight(quantize(W, qp), qp.scale, qp.zero_point, cfg.bits, qp.group_size)
