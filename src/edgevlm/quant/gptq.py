"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), as a pure function of a weight and its Hessian.

Given calibration inputs X (K, n) of a linear layer, GPTQ minimises ‖WX − ŴX‖² one column at a
time: H = 2XXᵀ/n, damped by `percdamp`·mean(diag H) (dead inputs, diag H = 0, get H_jj = 1 and
W_:j = 0); with U the upper Cholesky factor of H⁻¹, column j is rounded and its error
e = (w_j − q_j)/U_jj is spread over the not-yet-quantized columns, w_{j:} −= e·U_{j,j:}. Updates
are applied lazily in blocks of `gptq_block` columns (the paper's "lazy batch" trick).

Groups: without act-order, a group's qparams are chosen from the error-updated weights when the
algorithm reaches its first column (as in the reference). With act-order (columns visited by
decreasing diag H), groups must still be contiguous in the stored format, so their qparams are
fixed up front from the original weights ("static groups" of the reference implementation).
`clip` (an (N, G) tensor or a float) shrinks each group's range; Q-VLM passes its search result.
A group size that does not divide K leaves a ragged last group (K mod group_size columns, G =
ceil(K / group_size)) whose qparams are chosen from its own columns only, like any other group.
"""

from __future__ import annotations

import torch

from edgevlm.quant.primitives import (
    QuantConfig,
    QuantizedWeight,
    choose_qparams,
    n_groups,
)


def hessian(X: torch.Tensor) -> torch.Tensor:
    """H = 2XᵀX/n for inputs X (n tokens, K)."""
    X = X.double()
    return (2.0 / X.shape[0]) * (X.T @ X)


def quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig,
                    clip: float | torch.Tensor = 1.0) -> QuantizedWeight:
    """W (N, K), H (K, K) -> integers and qparams chosen with GPTQ's error feedback."""
    W = W.detach().double().clone()
    H = H.detach().to(W.device, torch.float64).clone()
    n, k = W.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    G = n_groups(k, gs)  # the last group holds k - (G - 1)·gs columns
    knobs = cfg.gptq  # percdamp, act_order, gptq_block
    assert knobs.gptq_block % gs == 0 or gs == k, \
        f"gptq_block {knobs.gptq_block} does not start on group boundaries of {gs}"
    clip = torch.as_tensor(clip, dtype=torch.float32, device=W.device).expand(n, G)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = None
    if knobs.act_order or gs == k:
        static = choose_qparams(W.float(), cfg.bits, gs, cfg.symmetric, clip, cfg.signed)
    perm = (torch.argsort(torch.diag(H), descending=True) if knobs.act_order
            else torch.arange(k, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]

    H += knobs.percdamp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    maxq = (1 << cfg.bits) - 1
    Q = torch.zeros((n, k), dtype=torch.int32, device=W.device)
    scales = torch.zeros((n, G), dtype=torch.float32, device=W.device)
    zeros = torch.zeros((n, G), dtype=torch.int32, device=W.device)
    if static is not None:
        scales, zeros = static.scale, static.zero_point

    for i1 in range(0, k, knobs.gptq_block):
        i2 = min(i1 + knobs.gptq_block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # original column index
            g = col // gs
            if static is None and col % gs == 0:  # first column of a group: choose its qparams
                # i1 and gs are aligned, so the group is in W1; a ragged last group ends at K
                stop = min(i + gs, i2 - i1)
                qp = choose_qparams(W1[:, i:stop].float(), cfg.bits, -1, cfg.symmetric,
                                    clip[:, g: g + 1], cfg.signed)
                scales[:, g: g + 1], zeros[:, g: g + 1] = qp.scale, qp.zero_point
            # primitives.quantize / dequantize for one column, written out: through them
            # every column paid for expanding its group's qparams to the whole row
            scale, zero = scales[:, g: g + 1], zeros[:, g: g + 1].to(torch.float32)
            w = W1[:, i: i + 1]
            q = (torch.round(w.float() / scale) + zero).clamp_(0, maxq)
            Q[:, col: col + 1] = q.to(torch.int32)
            err = (w - ((q - zero) * scale).double()) / U1[i, i]
            W1[:, i:] -= err @ U1[i: i + 1, i:]
            E1[:, i: i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return QuantizedWeight(Q, scales.contiguous(), zeros.contiguous(), cfg.bits, gs)
