"""LLaVA data as the releases ship it: LLaVA-665k's nested image folders, text-only (ShareGPT)
conversations mixed with image ones, multi-turn entries and samples over --max-length, through
train, eval and distill."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from edgevlm import train
from edgevlm.data import IGNORE, Collator, fit_samples, load_samples
from edgevlm.errors import UserError
from edgevlm.models import load_model

CLI = [sys.executable, "-m", "edgevlm.cli"]
MAX_LENGTH = 64
N_IMG = 9  # the micro model's image tokens (48 px / 16 px patches, all kept)
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
LONG_QUESTION = " ".join(["What color is the circle or the square or the triangle?"] * 8)


def _rows() -> list[dict]:
    img = [
        {"id": "coco-1", "image": "coco/train2017/000000000009.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "gqa-2", "image": "gqa/images/n161313.png",
         "conversations": [{"from": "human", "value": "What color is the square?\n<image>"},
                           {"from": "gpt", "value": "green"},
                           {"from": "human", "value": "How many shapes are there?"},
                           {"from": "gpt", "value": "one"}]},
        # many turns: over MAX_LENGTH, its image and first prompt fit -> truncated
        {"id": "coco-long", "image": "coco/train2017/000000000025.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                           {"from": "gpt", "value": "blue"}]
         + [{"from": h, "value": v} for _ in range(6) for h, v in
            (("human", "How many shapes are there?"), ("gpt", "one"))]},
    ]
    text = [
        {"id": "sharegpt-1", "model": "", "conversations": [
            {"from": "human", "value": "What color is grass?"},
            {"from": "gpt", "value": "green"}]},
        {"id": "sharegpt-2", "image": None, "conversations": [
            {"from": "human", "value": "How many shapes are in a pair?"},
            {"from": "gpt", "value": "two"},
            {"from": "human", "value": "And in a triple?"},
            {"from": "gpt", "value": "three"}]},
        # its first question alone is over MAX_LENGTH -> skipped
        {"id": "sharegpt-long", "conversations": [
            {"from": "human", "value": LONG_QUESTION}, {"from": "gpt", "value": "red"}]},
    ]
    return [img[0], text[0], img[1], text[1], img[2], text[2]]


@pytest.fixture(scope="module")
def llava665k(tmp_path_factory):
    """A llava_v1_5_mix665k.json-shaped file; images under coco/ and gqa/ as the release has."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("playground") / "data"
    rows = _rows()
    for row, color in zip([r for r in rows if r.get("image")], COLORS.values()):
        path = root / row["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (61, 47), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((10, 8, 50, 40), fill=color)
        im.save(path)
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(rows))
    return root / "llava_v1_5_mix665k.json"


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


def test_reads_text_only_and_nested_images(llava665k):
    samples = load_samples(llava665k)
    assert [s.image is None for s in samples] == [False, True, False, True, False, True]
    assert samples[2].image == (llava665k.parent / "gqa/images/n161313.png").resolve()
    assert len(samples[3].turns) == 2 and samples[3].answer == "three"
    # --image-root: the same file read from elsewhere
    moved = llava665k.parent.parent / "elsewhere.json"
    moved.write_text(llava665k.read_text())
    with pytest.raises(UserError, match=r"entry 0: image .*000000000009.png does not exist.*"
                                        "--image-root"):
        load_samples(moved)
    assert [s.image for s in load_samples(moved, llava665k.parent)] == [s.image for s in samples]


def test_mixed_batch_has_one_pixel_row_per_image(llava665k, micro):
    samples = load_samples(llava665k)[:4]  # image, text, image, text
    batch = Collator(micro.processor, micro.num_image_tokens, MAX_LENGTH)(samples)
    assert batch["pixel_values"].shape == (2, 3, 48, 48)
    per_row = (batch["input_ids"] == micro.image_token_id).sum(1).tolist()
    assert per_row == [N_IMG, 0, N_IMG, 0]
    out = micro.model(**batch)
    assert math.isfinite(out.loss.item())
    text_only = Collator(micro.processor, micro.num_image_tokens)([samples[1], samples[3]])
    assert text_only["pixel_values"] is None
    assert math.isfinite(micro.model(**text_only).loss.item())


def test_over_long_samples_are_truncated_after_the_image_or_skipped(llava665k, micro):
    samples = load_samples(llava665k)
    collate = Collator(micro.processor, micro.num_image_tokens, MAX_LENGTH)
    lengths = {s.id: len(collate.encode(s).ids) for s in samples}
    assert lengths["coco-long"] > MAX_LENGTH >= collate.encode(samples[4]).keep
    assert collate.encode(samples[5]).keep > MAX_LENGTH  # its first prompt alone is too long
    assert sum(n > MAX_LENGTH for n in lengths.values()) == 2

    fit = fit_samples(samples, collate)
    assert (fit.truncated, fit.skipped) == (["coco-long"], ["sharegpt-long"])
    assert [s.id for s in fit.samples] == [s.id for s in samples if s.id != "sharegpt-long"]
    assert fit.text_only == 2 and fit.longest == max(lengths.values())

    whole = collate.encode(samples[4])
    batch = collate([samples[4]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.shape[0] == MAX_LENGTH
    assert ids.tolist() == whole.ids[:MAX_LENGTH] and labels.tolist() == whole.labels[:MAX_LENGTH]
    img = (ids == micro.image_token_id).nonzero().flatten()
    assert len(img) == N_IMG and img[-1] - img[0] == N_IMG - 1  # the whole run, contiguous
    assert (labels[: img[-1] + 1] == IGNORE).all()
    taught = labels != IGNORE
    assert torch.equal(labels[taught], ids[taught])
    tok = micro.processor.tokenizer
    # the first answer whole, then the answers that fit, the last one possibly cut
    full = "".join(a + "<|im_end|>" for _, a in samples[4].turns)
    assert full.startswith(tok.decode(labels[taught].tolist()))
    assert tok.decode(labels[taught].tolist()).startswith("blue<|im_end|>one<|im_end|>")

    skip = fit_samples(samples, Collator(micro.processor, micro.num_image_tokens, MAX_LENGTH,
                                         "skip"))
    assert (skip.truncated, skip.skipped) == ([], ["coco-long", "sharegpt-long"])


@pytest.mark.slow
def test_max_length_too_small_is_one_clear_error(llava665k, micro_model_dir, micro, tmp_path):
    samples = load_samples(llava665k)
    collate = Collator(micro.processor, micro.num_image_tokens, 8)
    need = min(collate.encode(s).keep for s in samples)
    with pytest.raises(UserError, match=rf"--max-length 8 is too small .* needs {need} tokens; "
                                        rf"give --max-length {need} or more"):
        fit_samples(samples, collate)
    cfg = train.TrainConfig(steps=1, max_length=need, save_every=10)
    r = train.run(load_model(micro_model_dir), samples, tmp_path / "m", cfg, quiet=True)
    assert len(r.data.samples) >= 1 and len(r.data.skipped) == len(samples) - len(r.data.samples)

    cmd = [*CLI, "train", str(micro_model_dir), str(llava665k), "--out", str(tmp_path / "o"),
           "--steps", "1", "--quiet"]
    res = subprocess.run([*cmd, "--max-length", "8"], capture_output=True, text=True)
    assert res.returncode == 2 and not (tmp_path / "o").exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"give --max-length {need} or more" in lines[0], res.stderr
    res = subprocess.run([*cmd, "--max-length", "300"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "max_position_embeddings 256; give --max-length 256 or less" in res.stderr
    res = subprocess.run([*cmd, "--long-samples", "cut"], capture_output=True, text=True)
    assert res.returncode == 2 and "--long-samples 'cut' is not one of truncate, skip" in res.stderr


def test_trains_and_evaluates_on_the_665k_layout(llava665k, micro_model_dir, tmp_path):
    from edgevlm.evaluate import evaluate

    samples = load_samples(llava665k)
    cfg = train.TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup=1, save_every=100,
                            max_length=MAX_LENGTH)
    r = train.run(load_model(micro_model_dir), samples, tmp_path / "m", cfg, quiet=True)
    assert all(math.isfinite(h["loss"]) for h in r.history) and len(r.history) == 4
    report = json.loads((tmp_path / "m" / "train_data.json").read_text())
    assert report["samples"] == 6 and report["trained"] == 5 and report["text_only"] == 2
    assert (report["truncated_ids"], report["skipped_ids"]) == (["coco-long"], ["sharegpt-long"])

    result = evaluate(load_model(tmp_path / "m"), samples, max_new_tokens=3, batch_size=4,
                      quiet=True)
    assert result.score.total == len(samples) == len(result.predictions)
    assert result.accuracy == sum(p.correct for p in result.predictions) / len(samples)
    assert [p.id for p in result.predictions] == [s.id for s in samples]


@pytest.mark.slow
def test_cli_train_and_eval_report_counts(llava665k, micro_model_dir, tmp_path):
    out = tmp_path / "m"
    res = subprocess.run([*CLI, "train", str(micro_model_dir), str(llava665k), "--out", str(out),
                          "--steps", "2", "--batch-size", "3", "--max-length", str(MAX_LENGTH),
                          "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(res.stdout)
    assert (summary["samples"], summary["text-only"], summary["max length"]) == (6, 2, MAX_LENGTH)
    assert (summary["truncated"], summary["skipped (too long)"]) == (1, 1)
    res = subprocess.run([*CLI, "eval", str(out), str(llava665k), "--json",
                          str(tmp_path / "e.json"), "--max-new-tokens", "2", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e.json").read_text())["total"] == 6
