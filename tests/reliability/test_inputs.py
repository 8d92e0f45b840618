"""Data entries and prompts that the torch paths must refuse in one line (issue 20, items 4 and 7):
a prompt past the model's positions in `eval` and in `bench`'s torch target (the runtime
refuses the same prompt), a null answer, a null image under an `<image>` tag and an image URL."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.reliability.test_outputs import run
from tests.tools import without_notes


def first_entry(shapes_dir) -> dict:
    return json.loads((shapes_dir / "eval.json").read_text())[0]


def write(tmp_path, shapes_dir, entry: dict):
    shutil.copytree(shapes_dir / "images", tmp_path / "images", dirs_exist_ok=True)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([entry]))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_a_prompt_past_the_models_positions_is_one_line(command, micro_model_dir, shapes_dir,
                                                        tmp_path):
    entry = first_entry(shapes_dir)
    # the micro model has 256 positions; 300 words are well over them
    entry["conversations"][0]["value"] += " why" * 300
    data = write(tmp_path, shapes_dir, entry)
    args = ([command, micro_model_dir, data] if command == "eval"
            else [command, micro_model_dir, "--data", data, "--timing-samples", "1",
                  "--repeats", "1", "--warmup", "0"])
    code, text = run(*args, "--max-new-tokens", "4", "--quiet")
    assert code == 2, text
    assert without_notes(text).startswith("error:"), text
    assert len(without_notes(text).splitlines()) == 1, text
    assert "past the model's 256 positions" in text and "eval-0" in text, text


@pytest.mark.slow
def test_a_prompt_that_fits_with_its_answer_still_runs(micro_model_dir, shapes_dir, tmp_path):
    entry = first_entry(shapes_dir)
    data = write(tmp_path, shapes_dir, entry)
    code, text = run("eval", micro_model_dir, data, "--max-new-tokens", "4", "--quiet",
                     "--json", tmp_path / "r.json")
    assert code == 0, text
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 1


@pytest.mark.parametrize("case, expected", [
    ("null answer", "the gpt turn's 'value' is null; give the message's text as a string"),
    ("number question", "the human turn's 'value' is 7; give the message's text"),
    ("null image", "has 1 '<image>' tag(s) but 'image' is null; add the image path"),
    ("URL image", "'image' is a URL (https://example.com/cat.png); edgevlm reads local files "
                  "only and never downloads"),
])
@pytest.mark.slow
def test_bad_entries_are_named_in_one_line(case, expected, micro_model_dir, shapes_dir,
                                           tmp_path):
    entry = first_entry(shapes_dir)
    if case == "null answer":
        entry["conversations"][1]["value"] = None
    elif case == "number question":
        entry["conversations"][0]["value"] = 7
    elif case == "null image":
        entry["image"] = None
    else:
        entry["image"] = "https://example.com/cat.png"
    data = write(tmp_path, shapes_dir, entry)
    code, text = run("eval", micro_model_dir, data, "--quiet")
    assert code == 2, text
    assert without_notes(text).startswith("error:"), text
    assert len(without_notes(text).splitlines()) == 1, text
    assert "data.json entry 0: " in text and expected in text, text


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [("--max-new-tokens", "-1"), ("--limit", "0"),
                                           ("--batch-size", "0")])
def test_eval_options_out_of_range_are_one_line(option, value, micro_model_dir, shapes_dir):
    code, text = run("eval", micro_model_dir, shapes_dir / "eval.json", option, value, "--quiet")
    assert code == 2, text
    assert text == f"error: {option} {value} must be an integer of at least 1", text
