"""The deploy end of the real-LM chain: quantize, export, bench the trained SmolLM2-135M VQA
model.

    python -m benchmarks.smollm2 deploy [--calib-samples 128] [--family llava|smolvlm]
    python -m benchmarks.smollm2.deploy [--calib-samples 128] [--family llava|smolvlm]  # alone

The subject is runs/smollm2-llava, the model the chain's `vqa` step (benchmarks.smollm2.vqa)
trains (SmolLM2-135M under a SigLIP tower, 196 image tokens). Each step is the CLI command a user
types, run as a subprocess and timed (benchmarks.harness.run_step):

  1. edgevlm quantize runs/smollm2-llava --out runs/smollm2-gptq4 --method gptq --bits 4
         --symmetric --calib runs/shapes/train.json       (group 128: ragged on 576-wide layers)
  2. edgevlm export runs/smollm2-gptq4 --out runs/smollm2-gptq4-onnx --precision int4
         (the built decoder carrying the checkpoint's integers, validation on)
  3. edgevlm export runs/smollm2-llava --out runs/smollm2-int4-onnx --precision int4
         (the float model, rounded to nearest by the exporter: the no-calibration baseline)
  4. edgevlm eval MODEL --text runs/pydoc.txt   for the float model and the GPTQ checkpoint
         (perplexity needs every position's logits; a built decoder returns only the last)
  5. edgevlm bench <the GPTQ checkpoint and the two exports> --data runs/shapes/eval.json
         --max-new-tokens 8 (accuracy on the 300 held-out questions, TTFT, decode rate, disk,
         peak RSS; with --bench-float the float torch model too. smollm2_vqa.json holds the
         float accuracy of the run that wrote it; a retrained model is not bit-identical on CPU,
         so bench it here)

Writes benchmarks/results/smollm2_chain.json (and the bench report beside it, smollm2_chain/;
--out names the folder). A rerun skips the folders that exist.

`--family smolvlm` runs the same chain on runs/smolvlm-smollm2 (`vqa --family smolvlm`: the
Idefics3 shell, 245 image tokens from 2 x 2 tiles + the global image) into
runs/smolvlm-*, writing benchmarks/results/smolvlm_chain.json and smolvlm_chain/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks import harness


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS, out_help="folder for STEM_chain.json and "
                        "the bench report STEM_chain/ (default: %(default)s)", threads=2)
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--family", choices=("llava", "smolvlm"), default="llava")
    ap.add_argument("--bench-float", action="store_true", help="bench the float torch model "
                    "too (about 12 min more on 2 cores)")
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    results = args.out
    r = args.runs
    stem, name = {"llava": ("smollm2", "smollm2-llava"),
                  "smolvlm": ("smolvlm", "smolvlm-smollm2")}[args.family]
    model, data, text = r / name, r / "shapes", r / "pydoc.txt"
    if not model.is_dir():
        raise SystemExit(f"{model} is missing; train it with python -m benchmarks.smollm2 vqa "
                         f"--family {args.family}")
    gptq, gptq_onnx = r / f"{stem}-gptq4", r / f"{stem}-gptq4-onnx"
    rtn_onnx = r / f"{stem}-int4-onnx"
    path = results / f"{stem}_chain.json"
    result = harness.load(path)

    def save():
        harness.write(path, result, record=record)

    steps = {
        "quantize": ([
            "edgevlm", "quantize", str(model), "--out", str(gptq), "--method", "gptq",
            "--bits", "4", "--symmetric", "--calib", str(data / "train.json"),
            "--calib-samples", str(args.calib_samples), "--quiet"], gptq),
        "export_gptq": ([
            "edgevlm", "export", str(gptq), "--out", str(gptq_onnx), "--precision", "int4",
            "--quiet"], gptq_onnx),
        "export_float_int4": ([
            "edgevlm", "export", str(model), "--out", str(rtn_onnx), "--precision", "int4",
            "--quiet"], rtn_onnx),
    }
    for name, (cmd, out) in steps.items():
        step = harness.run_step(cmd, skip_if=out)
        if not step.skipped:
            result[name] = step.to_dict()
            save()
    result["quant_report"] = json.loads((gptq / "quant_report.json").read_text())
    for name, out in (("export_gptq", gptq_onnx), ("export_float_int4", rtn_onnx)):
        manifest = json.loads((out / "edgevlm.json").read_text())
        result.setdefault(name, {})["parity"] = manifest.get("parity")
        result[name]["decoder"] = manifest.get("decoder")
    save()

    for name, folder in (("float", model), ("gptq4", gptq)):
        key = f"perplexity_{name}"
        if key in result:
            continue
        out = results / f".ppl_{name}.json"
        cmd = ["edgevlm", "eval", str(folder), "--text", str(text), "--quiet", "--json", str(out)]
        step = harness.run_step(cmd)
        result[key] = {**json.loads(out.read_text())["perplexity"], **step.to_dict()}
        out.unlink()
        save()

    report = results / f"{stem}_chain"
    if "bench" not in result:
        targets = ([str(model)] if args.bench_float else []) + [str(gptq), str(gptq_onnx),
                                                                 str(rtn_onnx)]
        cmd = ["edgevlm", "bench", *targets,
               "--data", str(data / "eval.json"), "--max-new-tokens", "8",
               "--threads", str(args.threads), "--report", str(report), "--overwrite", "--quiet"]
        step = harness.run_step(cmd)
        bench = json.loads((report / "bench.json").read_text())
        result["bench"] = {**step.to_dict(), "targets": [
            {k: t.get(k) for k in ("name", "backend", "precision", "accuracy", "per_type",
                                   "ttft_s", "decode_tokens_per_s", "disk_bytes",
                                   "peak_rss_bytes", "n_prompt_tokens")}
            for t in bench["targets"]]}
        # The GPTQ checkpoint (torch) against its int4 export: answers identical in text.
        by_path = {t["path"]: [p["prediction"] for p in t["predictions"]]
                   for t in bench["targets"]}
        a, b = by_path.get(str(gptq)), by_path.get(str(gptq_onnx))
        if a and b:
            result["bench"]["gptq_torch_vs_export_identical"] = sum(x == y for x, y in zip(a, b))
            result["bench"]["compared"] = len(a)
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "quant_report"}, indent=1))


if __name__ == "__main__":
    main()
