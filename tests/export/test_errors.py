"""Bad input is a UserError that names the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from edgevlm.errors import UserError
from edgevlm.export import ExportConfig, ParityError, export
from edgevlm.export import validate as validate_module


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_not_a_llava_model(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="'bert' is not a model family edgevlm knows"):
        export(model, tmp_path / "out")
    with pytest.raises(UserError, match="no config.json"):
        export(tmp_path / "missing", tmp_path / "out")
    assert _entries(tmp_path) == ["bert"]


def test_unsupported_quantized_checkpoint_is_refused(teacher_dir, tmp_path):
    model = tmp_path / "quantized"
    shutil.copytree(teacher_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="needs a 4-bit pack-quantized checkpoint"):
        export(model, tmp_path / "out")
    assert _entries(tmp_path) == ["quantized"]


def test_out_exists(teacher_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        export(teacher_dir, out)
    assert _entries(tmp_path) == ["out"] and _entries(out) == ["keep.txt"]


@pytest.mark.parametrize("field,value,message", [
    ("block_size", 48, "power of two"),
    ("precision", "int3", "--precision 'int3' is not a precision"),
    ("vision_precision", "bf16", "--vision-precision 'bf16'"),
    ("opset", 11, "opset 11 is out of range"),
])
def test_config_validation(field, value, message):
    with pytest.raises(UserError, match=message):
        ExportConfig(**{field: value})


def test_failed_parity_raises_and_writes_nothing(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "FP32_MAX_ABS", 0.0)  # no graph can pass this
    with pytest.raises(ParityError, match="do not match torch.*--no-validate") as info:
        export(teacher_dir, tmp_path / "out")
    assert not info.value.parity.passed
    assert _entries(tmp_path) == []
