"""GPTQ and RTN as pure functions: GPTQ's output error beats RTN's on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from edgevlm.quant import gptq, rtn
from edgevlm.quant.methods import GptqConfig
from edgevlm.quant.primitives import QuantConfig, dequantize, quantize


def correlated_inputs(n=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g)
    mix = torch.randn(16, k, generator=g)
    return base @ mix + 0.1 * torch.randn(n, k, generator=g)  # (n, K), rank ~16 + noise


def out_err(W, Wq, X):
    return ((X @ (W - Wq).T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", [
    (4, 32, False, False), (3, 64, False, False), (4, -1, False, True), (3, 32, True, False)])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, act_order, symmetric):
    torch.manual_seed(1)
    W = torch.randn(64, 128)
    X = correlated_inputs()
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size,
                      gptq=GptqConfig(act_order=act_order), symmetric=symmetric)
    qr = rtn.quantize_weight(W, cfg)
    qg = gptq.quantize_weight(W, gptq.hessian(X), cfg)
    e_rtn, e_gptq = out_err(W, qr.dequantize(), X), out_err(W, qg.dequantize(), X)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    # The integers are consistent with the qparams: re-quantizing the dequantized weight
    # through the primitives gives the same integers.
    assert torch.equal(quantize(qg.dequantize(), qg.qparams), qg.q)
    assert qg.q.max() <= 2**bits - 1 and qg.scale.shape == qr.scale.shape


def test_gptq_with_identity_hessian_is_rtn():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    cfg = QuantConfig(method="gptq", bits=4, group_size=32)
    # With H = I the error feedback to other columns is zero, so GPTQ rounds to nearest.
    qg = gptq.quantize_weight(W, torch.eye(64), cfg)
    qr = rtn.quantize_weight(W, cfg)
    assert torch.equal(qg.q, qr.q) and torch.allclose(qg.scale, qr.scale)


def test_dead_inputs_get_zero_weight():
    torch.manual_seed(0)
    W = torch.randn(8, 64)
    X = correlated_inputs(256, 64)
    X[:, 5] = 0
    qw = gptq.quantize_weight(W, gptq.hessian(X), QuantConfig(method="gptq", group_size=32))
    assert dequantize(qw.q, qw.qparams)[:, 5].abs().max() == 0


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_last_group_gets_its_own_qparams(act_order):
    torch.manual_seed(2)
    W = torch.randn(32, 96)
    W[:, 64:] *= 8
    X = correlated_inputs(k=96)
    cfg = QuantConfig(method="gptq", bits=4, group_size=64, gptq=GptqConfig(act_order=act_order))
    qg = gptq.quantize_weight(W, gptq.hessian(X), cfg)
    qr = rtn.quantize_weight(W, cfg)
    assert qg.scale.shape == qr.scale.shape == (32, 2) and qg.group_size == 64 and qg.ragged
    assert torch.equal(quantize(qg.dequantize(), qg.qparams), qg.q)
    # The ragged group's scale follows its own (8x wider) columns, not the first group's.
    assert (qg.scale[:, 1].abs() > 3 * qg.scale[:, 0].abs()).all()  # signed rule: ± scales
    e_rtn, e_gptq = out_err(W, qr.dequantize(), X), out_err(W, qg.dequantize(), X)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    # With H = I there is no error feedback: GPTQ is RTN, ragged group included.
    qi = gptq.quantize_weight(W, torch.eye(96), cfg)
    assert torch.equal(qi.q, qr.q) and torch.equal(qi.scale, qr.scale)


def test_qvlm_group_clip_scores_the_ragged_group_on_its_own_columns():
    from edgevlm.quant.primitives import choose_qparams, fake_quantize
    from edgevlm.quant.qvlm import group_clip

    torch.manual_seed(3)
    W = torch.randn(16, 96)
    W[:, 90] = 6.0  # an outlier in the ragged group makes clipping pay there
    H = gptq.hessian(correlated_inputs(k=96)).float()
    cfg = QuantConfig(method="qvlm", bits=4, group_size=64)
    clip = group_clip(W, H, cfg)
    assert clip.shape == (16, 2)
    # Brute force over the ragged group's 32 columns and H block alone.
    Wg, Hg = W[:, 64:], H[64:, 64:]
    errs = torch.stack([torch.einsum("ni,ij,nj->n", d, Hg, d) for d in (
        Wg - fake_quantize(Wg, choose_qparams(Wg, 4, -1, cfg.symmetric, a, cfg.signed))
        for a in cfg.qvlm.clip_grid)])
    best = torch.tensor(cfg.qvlm.clip_grid)[errs.argmin(0)]
    assert torch.equal(clip[:, 1], best)
