"""LLaVA-format reading, bad input, the collator's labels, and the shapes generator."""

from __future__ import annotations

import json

import pytest

from edgevlm.data import IGNORE, Collator, load_samples
from edgevlm.errors import UserError


def _write(tmp_path, rows, image=True):
    if image:
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    p = tmp_path / "d.json"
    p.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return p


def _conv(q="<image>\nWhat?", a="red"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_reads_llava_format(tmp_path):
    p = _write(tmp_path, [{"id": "x", "image": "a.png", "conversations": _conv()}])
    (s,) = load_samples(p)
    assert s.image == (tmp_path / "a.png").resolve()
    assert s.turns == (("<image>\nWhat?", "red"),) and s.answer == "red"


@pytest.mark.parametrize("rows, message", [
    ("[{", "not valid JSON"),
    ("[]", "holds no entries"),
    ('{"a": 1}', "must hold a JSON list"),
    ([{"image": "a.png", "conversations": _conv()}, {"image": "nope.png",
                                                     "conversations": _conv()}],
     "entry 1: image"),
    ([{"image": "../outside.png", "conversations": _conv()}], "leaves the data folder"),
    ([{"image": "a.png", "conversations": _conv(q="What?")}], "has 0 '<image>' tags"),
    ([{"image": "a.png", "conversations": _conv(q="<image><image>What?")}],
     "has 2 '<image>' tags"),
    ([{"conversations": _conv()}], "entry 0: has 1 '<image>' tag.* but there is no 'image'"),
    ([{"image": None, "conversations": _conv()}], "but 'image' is null; add the image path"),
    ([{"image": ["a.png", "a.png"], "conversations": _conv()}], "lists 2 images"),
    ([{"image": "", "conversations": _conv()}], "'image' is ''"),
    ([{"image": "a.png", "conversations": [{"from": "gpt", "value": "x"},
                                           {"from": "human", "value": "<image>"}]}],
     "must be a human then a gpt"),
])
def test_bad_data_names_the_problem(tmp_path, rows, message):
    p = _write(tmp_path, rows)
    with pytest.raises(UserError, match=message):
        load_samples(p)


def test_unreadable_image_is_named(tmp_path, micro_model_dir):
    from edgevlm.models import load_model

    (tmp_path / "bad.png").write_bytes(b"not a png")
    p = _write(tmp_path, [{"image": "bad.png", "conversations": _conv()}], image=False)
    lm = load_model(micro_model_dir)
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        Collator(lm.processor, lm.num_image_tokens)(load_samples(p))


def test_labels_cover_only_answers(shapes_dir, micro_model_dir):
    from edgevlm.models import load_model

    lm = load_model(micro_model_dir)
    samples = [s for s in load_samples(shapes_dir / "train.json") if len(s.turns) >= 2][:4]
    batch = Collator(lm.processor, lm.num_image_tokens)(samples)
    tok = lm.processor.tokenizer
    for row, s in zip(batch["labels"], samples):
        taught = tok.decode([t for t in row.tolist() if t != IGNORE])
        assert taught == "".join(a + "<|im_end|>" for _, a in s.turns)
    # the same ids the HF processor makes from the same prompt and image
    from edgevlm.data import open_image, to_messages

    s = samples[0]
    text = tok.apply_chat_template(to_messages(s.turns), tokenize=False)
    ref = lm.processor(images=open_image(s.image), text=text, return_tensors="pt")
    n = ref["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == ref["input_ids"][0].tolist()
    assert (batch["pixel_values"][0] - ref["pixel_values"][0]).abs().max() < 1e-6
    assert (batch["input_ids"][0] == lm.image_token_id).sum() == lm.num_image_tokens


def test_shapes_is_deterministic_and_disjoint(tmp_path):
    from edgevlm.data import shapes

    a = shapes.generate(tmp_path / "a", n_train=20, n_eval=10, seed=3)
    b = shapes.generate(tmp_path / "b", n_train=20, n_eval=10, seed=3)
    for name in ("train.json", "eval.json", "pretrain.json"):
        assert (a.out_dir / name).read_text() == (b.out_dir / name).read_text()
    assert (a.out_dir / "images/eval_00003.png").read_bytes() == \
        (b.out_dir / "images/eval_00003.png").read_bytes()
    train = {s.image.name for s in load_samples(a.out_dir / "train.json")}
    evals = load_samples(a.out_dir / "eval.json")
    assert not train & {s.image.name for s in evals}
    assert {s.type for s in evals} <= set(shapes.QUESTION_TYPES)
    assert all(len(s.turns) == 1 for s in evals)
