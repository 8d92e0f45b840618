"""Experiment: how far does the tiny-teacher get on shapes, for a given recipe?

Trains `--preset` from scratch (vision tower included) on `edgevlm data shapes` data and
reports eval accuracy per question type and the loss curve. `--split-turns` trains on every
question-answer turn as its own single-turn sample (the format the eval set uses).

    edgevlm data shapes runs/shapes20k --train 20000 --eval 300
    python benchmarks/teacher_recipe.py --data runs/shapes20k --steps 1200 --lr 5e-4 --split-turns

Writes benchmarks/results/teacher_recipe_<preset>_<steps>_<lr>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--split-turns", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("runs/teacher_recipe"))
    args = ap.parse_args()

    import torch

    from edgevlm import evaluate, train
    from edgevlm.data import load_samples
    from edgevlm.models import PRESETS, init_model, load_model
    from edgevlm.tokenizer import train_tokenizer

    torch.set_num_threads(2)
    samples = load_samples(args.data / "train.json")
    evals = load_samples(args.data / "eval.json")
    tok = train_tokenizer([t for s in samples for turn in s.turns for t in turn], 512)
    if args.split_turns:
        samples = [dataclasses.replace(s, turns=(("<image>\n" + q.replace("<image>\n", ""), a),))
                   for s in samples for q, a in s.turns]
    out = args.work / f"{args.preset}_{args.steps}_{args.lr:g}"
    cfg = train.TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            train_vision=True, warmup=20, save_every=10**9)
    t0 = time.time()
    result = train.run(init_model(PRESETS[args.preset], tok), samples, out, cfg, overwrite=True,
                       quiet=True)
    seconds = time.time() - t0
    score = evaluate.evaluate(load_model(out), evals, quiet=True).score.to_dict()
    h = result.history
    curve = {h[i]["step"]: sum(x["loss"] for x in h[i:i + 50]) / len(h[i:i + 50])
             for i in range(0, len(h), 150)}
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "train_seconds": seconds,
              "eval": score, "loss_curve": curve}
    res = Path(__file__).parent / "results" / f"teacher_recipe_{out.name}.json"
    res.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
