"""The three primitives: exact round trips, ranges, and the config's named errors."""

from __future__ import annotations

import re

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant.methods import GptqConfig
from edgevlm.quant.primitives import (
    QuantConfig,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_round_trip_is_exact(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    qp = choose_qparams(w, bits, group_size, symmetric)
    q = quantize(w, qp)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 2**bits - 1
    assert qp.scale.shape == (16, 128 // (128 if group_size == -1 else group_size))
    deq = dequantize(q, qp)
    # Integers survive dequantize -> quantize exactly, and fake-quantization is idempotent.
    assert torch.equal(quantize(deq, qp), q)
    assert torch.equal(fake_quantize(deq, qp), deq)
    # Round to nearest: every in-range weight is within half a step of its grid point.
    step = qp.scale.repeat_interleave(128 // qp.scale.shape[1], dim=1)
    inside = (w - deq).abs() <= step / 2 + 1e-6
    if not symmetric:  # asymmetric min/max covers every weight
        assert inside.all()
    else:
        assert inside.float().mean() > 0.99
    if symmetric:
        assert (qp.zero_point == 2 ** (bits - 1)).all()


def test_extremes_and_zero_groups_are_exact():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 3, 32)
    qp = choose_qparams(w, 4, 32, symmetric=False)
    deq = dequantize(quantize(w, qp), qp)
    # The zero point is rounded, so the extremes land within half a step of themselves.
    half = qp.scale[0, 0].item() / 2
    assert abs(deq[0, 0] + 1) <= half + 1e-6 and abs(deq[0, 31] - 3) <= half + 1e-6
    assert qp.scale[0, 0].item() == pytest.approx(4 / 15)
    assert torch.equal(deq[1:], torch.zeros(3, 64))  # all-zero groups come back as zeros
    assert torch.equal(deq[0, 32:], torch.zeros(32))


def test_clip_shrinks_range_per_group():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    full = choose_qparams(w, 4, 32, False)
    clip = torch.full((8, 2), 0.5)
    half = choose_qparams(w, 4, 32, False, clip)
    assert torch.allclose(half.scale, full.scale * 0.5, rtol=1e-5)


@pytest.mark.parametrize("field,value,words", [
    ("bits", 1, "2..8"), ("bits", 16, "2..8"), ("group_size", 48, "32, 64, 128"),
    ("method", "awq", "rtn"), ("calib_samples", 1, "at least"), ("max_block", 0, "one"),
    ("act_bits", 5, "16"), ("clip_grid", (1.2,), "(0, 1]"),
])
def test_config_errors_name_field_and_fix(field, value, words):
    with pytest.raises(UserError, match=rf"QuantConfig\.{field}=.*{re.escape(words[:4])}"):
        QuantConfig.from_dict({field: value})


def test_config_round_trips_json():
    import json

    cfg = QuantConfig(method="gptq", bits=3, group_size=64, skip=("lm_head",))
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("symmetric", [False, True])
def test_ragged_last_group_gets_its_own_qparams(symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    w[:, 64:] *= 10  # the ragged group (96 mod 64 = 32 columns) has a range of its own
    qp = choose_qparams(w, 4, 64, symmetric)
    assert qp.scale.shape == (8, 2) and qp.group_size == 64
    # Each group's qparams are those of its own columns alone: the ragged one sees 32 columns.
    for g, cols in enumerate((slice(0, 64), slice(64, 96))):
        alone = choose_qparams(w[:, cols], 4, -1, symmetric)
        assert torch.equal(qp.scale[:, g:g + 1], alone.scale)
        assert torch.equal(qp.zero_point[:, g:g + 1], alone.zero_point)
    assert (qp.scale[:, 1] > 3 * qp.scale[:, 0]).all()
    q = quantize(w, qp)
    deq = dequantize(q, qp)
    assert q.shape == (8, 96) and torch.equal(quantize(deq, qp), q)
    step = torch.cat([qp.scale[:, :1].expand(8, 64), qp.scale[:, 1:].expand(8, 32)], dim=1)
    err = (w - deq).abs() / step
    if symmetric:  # the signed grid's top end is one step short of +amax
        assert err.max() <= 1.0 + 1e-5 and (err <= 0.5 + 1e-5).float().mean() > 0.97
    else:
        assert err.max() <= 0.5 + 1e-5
    # Dequantization is (q − z)·s column by column, with the ragged group's own s and z.
    ref = torch.cat([(q[:, :64] - qp.zero_point[:, :1]) * qp.scale[:, :1],
                     (q[:, 64:] - qp.zero_point[:, 1:]) * qp.scale[:, 1:]], dim=1)
    assert torch.equal(deq, ref.float())


@pytest.mark.parametrize("group_size", [16, 256, 1024, -1])
def test_group_size_is_a_power_of_two_of_at_least_16(group_size):
    assert QuantConfig(group_size=group_size,
                       gptq=GptqConfig(gptq_block=max(128, group_size))).group_size == group_size
    for bad in (8, 48, 96, 0, -2):
        with pytest.raises(UserError, match=r"QuantConfig\.group_size=.*power of two >= 16"):
            QuantConfig(group_size=bad)
    with pytest.raises(UserError, match=r"QuantConfig\.gptq_block=128 .*multiple of the group "
                                        r"size, e.g\. 256"):
        QuantConfig(group_size=256)


def test_batch_entropy_equals_per_sample_histograms():
    """calibrate.batch_entropy (one bincount for the batch) gives each sample's own 256-bin
    entropy over its real tokens, as the per-sample histc loop did; a constant sample is 0."""
    from edgevlm.quant.calibrate import batch_entropy, entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 16, generator=g) * torch.tensor([1.0, 3.0, 0.1, 1.0])[:, None, None]
    x[3] = 2.5  # constant sample
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 5:] = False  # padding is left out
    mask[1, :2] = False
    got = batch_entropy(x, mask)
    want = [entropy(x[b][mask[b]]) for b in range(4)]
    assert got[3] == 0.0 and want[3] == 0.0
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    assert min(got[:3]) > 5.0  # 16·5+ values spread over most of 256 bins
