"""Experiment: how far does the tiny-teacher get on shapes, for a given recipe?

Trains `--preset` from scratch (vision tower included) on `edgevlm data shapes` data and
reports eval accuracy per question type and the loss curve. `--split-turns` trains on every
question-answer turn as its own single-turn sample (the format the eval set uses).

    edgevlm data shapes runs/shapes20k --train 20000 --eval 300
    python -m benchmarks.distill.teacher_recipe --data runs/shapes20k --steps 1200 --lr 5e-4 \
        --split-turns

Writes teacher_recipe_<preset>_<steps>_<lr>.json into --out (benchmarks/results).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks import harness


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(__doc__, out=harness.RESULTS, work=Path("runs/teacher_recipe"))
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--split-turns", action="store_true")
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)

    import torch

    from edgevlm import evaluate, train
    from edgevlm.data import load_samples
    from edgevlm.models import PRESETS, init_model, load_model
    from edgevlm.models.tokenizer import train_tokenizer

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
    result, seconds = harness.timed(train.run, init_model(PRESETS[args.preset], tok), samples,
                                    out, cfg, overwrite=True, quiet=True)
    score = evaluate.evaluate(load_model(out), evals, quiet=True).score.to_dict()
    h = result.history
    curve = {h[i]["step"]: sum(x["loss"] for x in h[i:i + 50]) / len(h[i:i + 50])
             for i in range(0, len(h), 150)}
    result = {"args": {k: harness.relative(str(v)) for k, v in vars(args).items()},
              "train_seconds": seconds, "eval": score, "loss_curve": curve}
    harness.write(args.out / f"teacher_recipe_{out.name}", result, record=record)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
