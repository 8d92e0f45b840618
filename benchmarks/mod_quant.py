"""An MoE student through quantize and export: GPTQ W4 on routed calibration, the int4 (QMoE)
export, and both scored on the same held-out questions.

    python benchmarks/mod_quant.py --model MOE_STUDENT --data runs/shapes [--work DIR]

MOE_STUDENT is an upcycled, trained LLaVA-MoD student (benchmarks/mod_ablation.py leaves them in
its work folder: mimic_seed_0/final). Steps, each a CLI command (skipped when its output
exists): `edgevlm quantize --method gptq --group-size 32`, `edgevlm export --precision int4`
of that checkpoint, and of the float model (experts rounded at export); then `edgevlm bench`
on the float model, the GPTQ checkpoint (torch) and both exports. Writes
benchmarks/results/mod_quant.json: accuracy of each, and how many answers the GPTQ checkpoint
and its QMoE export share.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from smollm2_chain import run  # beside this script: one CLI step, skipped when its OUT exists

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/mod_quant"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    gptq, gptq_onnx, rtn_onnx = w / "gptq4", w / "gptq4-onnx", w / "float-int4-onnx"
    result = {"command": f"python benchmarks/mod_quant.py --model {args.model} --data "
                         f"{args.data}", "model": str(args.model)}
    steps = {
        "quantize": (["edgevlm", "quantize", str(args.model), "--out", str(gptq), "--method",
                      "gptq", "--group-size", "32", "--calib", str(args.data / "train.json"),
                      "--quiet"], gptq),
        "export_gptq": (["edgevlm", "export", str(gptq), "--out", str(gptq_onnx),
                         "--precision", "int4", "--quiet"], gptq_onnx),
        "export_float_int4": (["edgevlm", "export", str(args.model), "--out", str(rtn_onnx),
                               "--precision", "int4", "--quiet"], rtn_onnx),
    }
    for name, (cmd, out) in steps.items():
        result[name] = {"command": shlex.join(cmd), "seconds": run(cmd, out)}
    for name, out in (("export_gptq", gptq_onnx), ("export_float_int4", rtn_onnx)):
        manifest = json.loads((out / "edgevlm.json").read_text())
        result[name].update(parity=manifest.get("parity"), decoder=manifest.get("decoder"),
                            int4_source=manifest.get("int4_source"))
    report = w / "bench"
    cmd = ["edgevlm", "bench", str(args.model), str(gptq), str(gptq_onnx), str(rtn_onnx),
           "--data", str(args.data / "eval.json"), "--max-new-tokens", "8", "--threads",
           str(args.threads), "--report", str(report), "--quiet"]
    result["bench_seconds"] = run(cmd, None)
    bench = json.loads((report / "bench.json").read_text())
    result["targets"] = [{k: t.get(k) for k in ("name", "path", "backend", "precision",
                                                "accuracy", "decode_tokens_per_s", "disk_bytes")}
                         for t in bench["targets"]]
    answers = {t["path"]: [p["prediction"] for p in t["predictions"]] for t in bench["targets"]}
    a, b = answers[str(gptq)], answers[str(gptq_onnx)]
    result["gptq_torch_vs_qmoe_export_identical"] = f"{sum(x == y for x, y in zip(a, b))} of " \
                                                    f"{len(a)}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mod_quant.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "export_gptq"}, indent=1,
                     default=str))


if __name__ == "__main__":
    main()
