"""The synthetic "shapes" visual QA set: images with a few coloured shapes on a 3x3 grid.

Deterministic from a seed. Written in the LLaVA conversation format (see DESIGN.md "Data") so
every stage reads it exactly as it reads LLaVA-Pretrain / LLaVA-665k:
  pretrain.json  one caption per image (for projector pre-training / DPT)
  train.json     1-3 question-answer turns per image
  eval.json      one question per entry, on images never seen in training
Each entry carries an extra "type" field (colour, shape, count, position, exist, left_of) that
evaluation uses for per-type accuracy; other tools ignore it.

The questions need the image: a model that sees blank images can only learn the answer priors
(yes/no balanced, 3-9 way choices), which is the <40% floor the foundation issue asks for.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
          "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "position", "exist", "left_of")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: int  # 0..8, row-major on the 3x3 grid

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class ShapesSummary:
    out_dir: Path
    n_pretrain: int
    n_train: int
    n_eval: int


def _scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 3)
    cells = rng.sample(range(9), n)
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    return [Obj(c, s, cell) for (c, s), cell in zip(combos, cells)]


def draw(objs: list[Obj], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in objs:
        r, c = divmod(o.cell, 3)
        half = cell * rng.uniform(0.30, 0.42)
        cx = (c + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        color = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[o.color])
        box = (cx - half, cy - half, cx + half, cy + half)
        if o.shape == "circle":
            d.ellipse(box, fill=color)
        elif o.shape == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    return img


def _questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """All askable (type, question, answer) triples for a scene, with balanced yes/no."""
    qs = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
    for o in objs:
        if shape_counts[o.shape] == 1:
            qs.append(("color", f"What color is the {o.shape}?", o.color))
        if color_counts[o.color] == 1:
            qs.append(("shape", f"What shape is the {o.color} object?", o.shape))
        qs.append(("position", f"Where is the {o.name}?", POSITIONS[o.cell]))
    qs.append(("count", "How many shapes are there?", NUMBERS[len(objs)]))
    present = rng.choice(objs)
    absent = rng.choice([(c, s) for c in COLORS for s in SHAPES
                         if all((o.color, o.shape) != (c, s) for o in objs)])
    if rng.random() < 0.5:
        qs.append(("exist", f"Is there a {present.name}?", "yes"))
    else:
        qs.append(("exist", f"Is there a {absent[0]} {absent[1]}?", "no"))
    pairs = [(a, b) for a in objs for b in objs if a.cell % 3 < b.cell % 3]
    if pairs:
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            qs.append(("left_of", f"Is the {a.name} left of the {b.name}?", "yes"))
        else:
            qs.append(("left_of", f"Is the {b.name} left of the {a.name}?", "no"))
    return qs


def _caption(objs: list[Obj]) -> str:
    parts = [f"a {o.name} at the {POSITIONS[o.cell]}" for o in objs]
    head = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "")
    return "There is " + head + parts[-1] + "."


def generate(out_dir: str | Path, n_train: int = 3000, n_eval: int = 300, seed: int = 0,
             image_size: int = 48, blank: bool = False) -> ShapesSummary:
    """Write images/, pretrain.json, train.json and eval.json into `out_dir`.

    `blank=True` writes the same questions over blank images (the "does it need the image"
    control). The caller makes the write atomic.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, train, evals = [], [], []
    for split, n in (("train", n_train), ("eval", n_eval)):
        for i in range(n):
            objs = _scene(rng)
            img = (Image.new("RGB", (image_size, image_size), (250, 250, 250)) if blank
                   else draw(objs, image_size, rng))
            rel = f"images/{split}_{i:05d}.png"
            img.save(out / rel)
            qs = _questions(objs, rng)
            if split == "eval":
                qtype, q, a = rng.choice(qs)
                evals.append(_entry(f"eval-{i}", rel, [(q, a)], qtype))
                continue
            pretrain.append(_entry(f"cap-{i}", rel, [("Describe the image.", _caption(objs))],
                                   "caption"))
            turns = rng.sample(qs, min(len(qs), rng.randint(1, 3)))
            train.append(_entry(f"train-{i}", rel, [(q, a) for _, q, a in turns], turns[0][0]))
    for name, rows in (("pretrain.json", pretrain), ("train.json", train), ("eval.json", evals)):
        (out / name).write_text(json.dumps(rows, indent=1))
    return ShapesSummary(out, len(pretrain), len(train), len(evals))


def _entry(id_: str, image: str, turns: list[tuple[str, str]], qtype: str) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return {"id": id_, "image": image, "type": qtype, "conversations": conv}
