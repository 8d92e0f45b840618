"""Sizes a config asks for are checked before anything is built (issue 33): a crafted
hidden_size of 10⁹ tried 3 TB, an intermediate_size of 3·10⁶ took 6.4 GB, 10⁶ layers built for
minutes. Each now ends in one line naming the field and its bound, or the memory the model
would need, in init --config and in every command that loads a model folder."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from edgevlm.errors import UserError
from edgevlm.models import PRESETS, create, load_model
from edgevlm.models.sizes import LIMITS, check_sizes
from tests.reliability.test_outputs import run
from tests.tools import without_notes


def preset(**text):
    cfg = copy.deepcopy(PRESETS["tiny-student"])
    cfg["text_config"].update(text)
    return cfg


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 10**9),
                                              ("intermediate_size", 3 * 10**6),
                                              ("num_hidden_layers", 10**6)])
def test_a_dimension_over_its_bound_is_one_line(field, value, tmp_path, shapes_dir):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset(**{field: value})))
    with pytest.raises(UserError, match=rf"text_config.{field} {value:,} is over "
                                        rf"{LIMITS[field]:,}, larger than any released model's"):
        create(tmp_path / "m", config_path=path, tokenizer_data=[shapes_dir / "train.json"])
    assert not (tmp_path / "m").exists()


def test_a_model_larger_than_the_machine_is_refused():
    cfg = preset(hidden_size=1 << 16, intermediate_size=1 << 18, num_hidden_layers=1000,
                 num_attention_heads=512, num_key_value_heads=512)
    with pytest.raises(UserError, match=r"about [\d,.]+B parameters, [\d,]+ GiB even in 16-bit, "
                                        r"more than this machine's [\d,]+ GiB of memory \("
                                        r"text_config.num_hidden_layers 1,000"):
        check_sizes(cfg, "config")


@pytest.mark.parametrize("value", [0, -3, 2.5, "64", True])
def test_a_dimension_that_is_not_a_positive_integer(value):
    with pytest.raises(UserError, match=r"text_config.hidden_size is .* it must be a positive "
                                        "integer"):
        check_sizes(preset(hidden_size=value), "config")


def test_real_model_sizes_pass():
    """Llama 3.1 405B's text config and a SigLIP-so400m tower are within every bound (the
    memory check aside, which this machine's RAM decides)."""
    from edgevlm.models.sizes import _dims

    llama = {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
             "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 131072}
    assert _dims(llama, "text_config", "config") == llama
    siglip = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
              "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
    assert _dims(siglip, "vision_config", "config") == siglip


def test_a_model_folder_with_a_crafted_config_is_refused_before_loading(micro_model_dir,
                                                                        tmp_path):
    model = tmp_path / "model"
    shutil.copytree(micro_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 10**9
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="text_config.hidden_size 1,000,000,000 is over"):
        load_model(model)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list, not an object of config fields"):
        load_model(model)


@pytest.mark.slow
def test_export_of_a_crafted_config_is_one_line(micro_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(micro_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 10**6
    (model / "config.json").write_text(json.dumps(cfg))
    code, text = run("export", model, "--out", tmp_path / "out")
    assert code == 2, text
    assert without_notes(text).startswith("error: ") and "num_hidden_layers 1,000,000" in text
    assert len(without_notes(text).splitlines()) == 1
    assert not (tmp_path / "out").exists()
