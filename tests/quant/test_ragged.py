"""Group sizes that do not divide a layer's width (SmolLM2's 576 with the default 128), on a
LLaVA whose text model is 96 wide: compressed-tensors cannot store a ragged last group, so the
checkpoint holds the largest power of two that divides every width, says so, and transformers
loads exactly our integers; a group wider than a layer is one named error."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig, quantize
from edgevlm.quant.checkpoint import REPORT, read_int4_layers, storable_group_size

FAST = dict(calib_samples=4, batch_size=4)
RUNS = {"rtn": dict(method="rtn", symmetric=False), "gptq": dict(method="gptq", symmetric=True)}


@pytest.fixture(scope="module")
def ragged(ragged_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ragged_quant")
    return {name: quantize(ragged_model_dir, out / name,
                           QuantConfig(group_size=64, **kw, **FAST),
                           calib=shapes_dir / "train.json")
            for name, kw in RUNS.items()}


def test_storable_group_size():
    smollm2 = {"q_proj": 576, "down_proj": 1536}
    used, note = storable_group_size(smollm2, 128)
    assert used == 64 and "q_proj (576 wide, 64 columns left over)" in note
    assert storable_group_size(smollm2, 64) == (64, None)
    assert storable_group_size({"a": 80, "b": 96}, 64)[0] == 16
    assert storable_group_size({"a": 200}, 128)[0] == -1  # 200 = 8 x 25: no group >= 16
    assert storable_group_size({"a": 200}, -1) == (-1, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_records_the_group_size_it_holds(ragged, name):
    r = ragged[name]
    rep = json.loads((r.out_dir / REPORT).read_text())
    assert rep["group_size"] == 32 and rep["group_size_requested"] == 64
    assert rep["config"]["group_size"] == 64  # what was asked for
    assert "model.language_model.layers.0.self_attn.q_proj (96 wide, 32 columns left over)" \
        in rep["group_size_note"]
    qcfg = json.loads((r.out_dir / "config.json").read_text())["quantization_config"]
    (group,) = qcfg["config_groups"].values()
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    assert r.layers_quantized == 14
    for layer, qw in r.weights.items():
        assert qw.group_size == 32 and not qw.ragged
        assert qw.scale.shape[1] == qw.q.shape[1] // 32, layer


@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_loads_exactly_our_weights(ragged, name):
    from transformers import CompressedTensorsConfig, LlavaForConditionalGeneration

    r = ragged[name]
    loads = [{"quantization_config": CompressedTensorsConfig(dequantize=True)}]
    if r.report["symmetric"]:  # plain from_pretrained (asymmetric: llm-compressor #1618)
        loads.append({})
    for kw in loads:
        model = LlavaForConditionalGeneration.from_pretrained(str(r.out_dir), **kw)
        with torch.no_grad():  # plain loads decompress on the first forward pass
            model(input_ids=torch.tensor([[1, 2, 3]]))
        modules = dict(model.named_modules())
        for layer, qw in r.weights.items():
            assert torch.equal(modules[layer].weight.data, qw.dequantize()), (layer, kw)
    for layer, (q, scale, zp, gs) in read_int4_layers(r.out_dir).items():
        assert gs == 32 and torch.equal(torch.from_numpy(q).int(), r.weights[layer].q)
        assert torch.equal(torch.from_numpy(scale), r.weights[layer].scale)
        assert torch.equal(torch.from_numpy(zp).int(), r.weights[layer].zero_point)


def test_gptq_beats_rtn_at_the_stored_group_size(ragged):
    assert ragged["gptq"].mean_error < ragged["rtn"].mean_error


def test_group_larger_than_a_layer_is_one_named_error(ragged_model_dir, tmp_path):
    with pytest.raises(UserError) as e:
        quantize(ragged_model_dir, tmp_path / "a", QuantConfig(method="rtn", group_size=128))
    assert str(e.value) == (
        "--group-size 128 is larger than the input width 96 of "
        "model.language_model.layers.0.self_attn.q_proj; choose --group-size -1 (one group per "
        "row) or --group-size 64")
    assert not (tmp_path / "a").exists()
