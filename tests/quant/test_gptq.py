"""GPTQ and RTN as pure functions: GPTQ's output error beats RTN's on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from edgevlm.quant import gptq, rtn
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
    cfg = QuantConfig(method="gptq", bits=bits, group_size=group_size, act_order=act_order,
                      symmetric=symmetric)
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
