"""KL(float ‖ quantized) per answer token of quantized checkpoints on an eval set.

    nice python -m benchmarks.quant.eval_kl --model FLOAT --data EVAL.json --limit 100 \
        --out results.json NAME=CHECKPOINT ...

Teacher-forced on the eval answers, as edgevlm.distill.measure.teacher_kl (the quantization
ablation's KL column): how far each checkpoint's answer distribution moved from the float
model's, on questions no calibration saw. Writes {name: kl} with the command.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--out", type=Path, required=True, help="results file (.json)")
    p.add_argument("checkpoints", nargs="+", help="NAME=FOLDER")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    import torch

    from edgevlm.data import load_samples
    from edgevlm.distill.measure import teacher_kl
    from edgevlm.models import load_model
    from edgevlm.quant.act import load_for_eval

    torch.set_num_threads(2)
    samples = load_samples(args.data)[: args.limit]
    fp = load_model(args.model)
    out = {"samples": len(samples), "kl_per_answer_token": {}}
    for item in args.checkpoints:
        name, folder = item.split("=", 1)
        out["kl_per_answer_token"][name] = teacher_kl(load_for_eval(folder), fp, samples,
                                                      batch_size=4)
        print(name, out["kl_per_answer_token"][name], flush=True)
        harness.write(args.out, out, record=record)


if __name__ == "__main__":
    main()
