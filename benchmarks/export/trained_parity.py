"""Whole-eval-set agreement of the runtime with torch, on a trained model.

For each pair (torch model folder, export of it), answers every eval question greedily with both
(transformers `generate` and edgevlm.runtime.VLM, the same code `edgevlm bench` times) and
reports: answers identical in text and token count, and each side's accuracy. Pairs:

  fp32   MODEL                        vs  export of MODEL at fp32      (must agree on every answer)
  int4   MODEL quantized (gptq W4 g128) vs export of that checkpoint, int4 decoder (the same
         integers), vision and embeddings fp32 as in the checkpoint (accuracy within 0.5
         points is the export issue's bar)

    python -m benchmarks.export.trained_parity --model runs/teacher --data runs/shapes

Writes trained_parity_<model name>.json into --out (benchmarks/results). Heavy steps run through
the CLI so the commands are the ones a user types.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import harness


def sh(*cmd: str) -> None:
    harness.run_step(cmd)


def compare(model: Path, export: Path, samples, max_new_tokens: int) -> dict:
    from edgevlm.bench.harness import BenchConfig, ExportTarget
    from edgevlm.bench.torch_target import TorchTarget
    from edgevlm.data.metrics import Score

    cfg = BenchConfig(provider="cpu", threads=2)
    torch_t, ort_t = TorchTarget(model, cfg), ExportTarget(export, cfg)
    scores, same, diffs = {"torch": Score(), "runtime": Score()}, 0, []
    for s in samples:
        a, b = torch_t.answer(s, max_new_tokens), ort_t.answer(s, max_new_tokens)
        scores["torch"].add(a.text, s.answer, s.type)
        scores["runtime"].add(b.text, s.answer, s.type)
        if (a.text, a.n_new_tokens) == (b.text, b.n_new_tokens):
            same += 1
        else:
            diffs.append({"id": s.id, "torch": a.text, "runtime": b.text})
    return {"model": harness.relative(model), "export": harness.relative(export),
            "samples": len(samples),
            "identical_answers": same, "torch_accuracy": scores["torch"].accuracy,
            "runtime_accuracy": scores["runtime"].accuracy,
            "accuracy_gap_points": 100 * (scores["runtime"].accuracy
                                          - scores["torch"].accuracy),
            "differences": diffs[:20]}


def main(argv: list[str] | None = None) -> None:
    ap = harness.parser(__doc__, out=harness.RESULTS, work=None)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="shapes folder (eval/train.json)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N eval questions only")
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    from edgevlm.data import load_samples

    work = args.work or args.model.parent / f"{args.model.name}-parity"
    work.mkdir(parents=True, exist_ok=True)
    samples = load_samples(args.data / "eval.json")[:args.limit]
    fp32, w4, w4x = work / "export-fp32", work / "gptq-w4", work / "export-int4"
    t0 = time.time()
    if not fp32.exists():
        sh("edgevlm", "export", str(args.model), "--out", str(fp32), "--precision", "fp32",
           "--quiet")
    if not w4.exists():
        sh("edgevlm", "quantize", str(args.model), "--out", str(w4), "--method", "gptq",
           "--bits", "4", "--group-size", "128", "--symmetric", "--calib",
           str(args.data / "train.json"), "--calib-samples", "128", "--quiet")
    if not w4x.exists():
        sh("edgevlm", "export", str(w4), "--out", str(w4x), "--precision", "int4",
           "--vision-precision", "fp32", "--embed-precision", "fp32", "--quiet")
    result = {"fp32": compare(args.model, fp32, samples, args.max_new_tokens),
              "int4": compare(w4, w4x, samples, args.max_new_tokens),
              "seconds": round(time.time() - t0, 1)}
    harness.write(args.out / f"trained_parity_{args.model.name}", result, record=record)
    for k in ("fp32", "int4"):
        r = result[k]
        print(f"{k}: {r['identical_answers']}/{r['samples']} identical answers, torch "
              f"{100 * r['torch_accuracy']:.1f}%, runtime {100 * r['runtime_accuracy']:.1f}% "
              f"(gap {r['accuracy_gap_points']:+.1f} points)")


if __name__ == "__main__":
    main()
