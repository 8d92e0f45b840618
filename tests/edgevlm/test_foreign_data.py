"""init / train / eval, unchanged, on data edgevlm did not generate: real photos and a logo that
ship with matplotlib (JPEG and RGBA PNG, odd sizes), laid out and phrased the way LLaVA-665k
files are (nested image folders, `<image>` after the question, string ids, extra keys, a
multi-turn conversation), with a CLIP + Llama LlavaConfig."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

CLI = [sys.executable, "-m", "edgevlm.cli"]
SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"

CLIP_LLAMA = {
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64,
                      "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
                      "projection_dim": 64},
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "max_position_embeddings": 256, "tie_word_embeddings": False},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}

ROWS = [
    {"id": "000000123", "image": "coco/train2017/grace_hopper.jpg", "model": "human-written",
     "conversations": [
         {"from": "human", "value": "Who is shown in this photo?\n<image>"},
         {"from": "gpt", "value": "Grace Hopper"},
         {"from": "human", "value": "Is she wearing a uniform?"},
         {"from": "gpt", "value": "Yes"}]},
    {"id": "logo-7", "image": "textvqa/train_images/logo2.png",
     "conversations": [
         {"from": "human", "value": "<image>\nWhat library does this logo belong to?"},
         {"from": "gpt", "value": "matplotlib"}]},
    {"id": "gift", "image": "ocr_vqa/images/Minduka_Present_Blue_Pack.png",
     "conversations": [
         {"from": "human", "value": "What object is drawn here? Answer in one word.\n<image>"},
         {"from": "gpt", "value": "present"}]},
]


def run(*args, cwd):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
def test_init_train_eval_on_real_images_in_llava_665k_layout(tmp_path):
    data = tmp_path / "llava665k"
    for row in ROWS:
        dst = data / row["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_DATA / Path(row["image"]).name, dst)
    (data / "mix.json").write_text(json.dumps(ROWS))
    (tmp_path / "clip_llama.json").write_text(json.dumps(CLIP_LLAMA))

    run("init", "m0", "--config", "clip_llama.json", "--tokenizer-data", data / "mix.json",
        "--quiet", cwd=tmp_path)
    run("train", "m0", data / "mix.json", "--out", "m", "--steps", 60, "--batch-size", 3,
        "--lr", 3e-3, "--warmup", 5, "--train-vision", "--quiet", cwd=tmp_path)
    run("eval", "m", data / "mix.json", "--json", "eval.json", "--quiet", cwd=tmp_path)

    report = json.loads((tmp_path / "eval.json").read_text())
    preds = {p["id"]: p for p in report["predictions"]}
    # The model memorised its three conversations: every last answer comes back exactly, the
    # multi-word and the mixed-case ones included, so images, turns and labels were all read.
    assert report["accuracy"] == 1.0, preds
    assert preds["000000123"]["prediction"] == "Yes"
    assert preds["logo-7"]["prediction"] == "matplotlib"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == "llama"
