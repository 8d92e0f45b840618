"""Weights that do not cover the config are refused, never filled with random values (issue 33):
a tensor missing from the safetensors, a config.json with more layers than the weights, and
pickle-format checkpoints each end in one line naming the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from edgevlm.errors import UserError
from edgevlm.models import load_model
from tests.reliability.test_outputs import run
from tests.tools import without_notes


@pytest.fixture
def model(micro_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(micro_model_dir, dst)
    return dst


def drop(model, predicate) -> list[str]:
    path = model / "model.safetensors"
    tensors = load_file(path)
    gone = sorted(k for k in tensors if predicate(k))
    save_file({k: v for k, v in tensors.items() if k not in gone}, path,
              metadata={"format": "pt"})
    return gone


def test_a_missing_tensor_is_named(model):
    gone = drop(model, lambda k: k.endswith("layers.0.self_attn.q_proj.weight")
                and "language_model" in k)
    assert len(gone) == 1
    with pytest.raises(UserError, match=r"the weights do not cover the model its config.json "
                                        r"describes; missing model.language_model.layers.0"
                                        r".self_attn.q_proj.weight\. Copy the complete"):
        load_model(model)


def test_more_layers_in_the_config_than_in_the_weights(model):
    config = json.loads((model / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    config["text_config"]["num_hidden_layers"] = layers + 1
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json is inconsistent \(`num_hidden_layers` "
                                        rf"\({layers + 1}\) must be equal to the number of "
                                        r"`layer_types`"):
        load_model(model)  # transformers' own check, in one line
    config["text_config"].pop("layer_types")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"missing model.language_model.layers.{layers}\.\S+, .* "
                                        r"and \d+ more"):
        load_model(model)


def test_a_pickle_checkpoint_is_refused_naming_safetensors(model):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickle-format weights \(\*.bin\), which edgevlm does "
                                        r"not load: unpickling can run code. Convert them to "
                                        "safetensors"):
        load_model(model)


@pytest.mark.slow
def test_export_of_a_model_missing_its_lm_head_is_one_line(model, tmp_path):
    assert drop(model, lambda k: "lm_head" in k)
    code, text = run("export", model, "--out", tmp_path / "out", "--no-validate")
    assert code == 2, text
    line = without_notes(text)
    assert line.startswith("error: ") and "lm_head.weight" in line, line
    assert len(line.splitlines()) == 1, text
    assert not (tmp_path / "out").exists()
