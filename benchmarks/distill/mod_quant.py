"""An MoE student through quantize and export: GPTQ W4 on routed calibration, the int4 (QMoE)
export, and both scored on the same held-out questions.

    python -m benchmarks.distill.mod_quant --model MOE_STUDENT --data runs/shapes [--work DIR]

MOE_STUDENT is an upcycled, trained LLaVA-MoD student (benchmarks.distill.mod_ablation leaves
them in its work folder: mimic_seed_0/final). Steps, each a CLI command (skipped when its output
exists): `edgevlm quantize --method gptq --group-size 32`, `edgevlm export --precision int4`
of that checkpoint, and of the float model (experts rounded at export); then `edgevlm bench`
on the float model, the GPTQ checkpoint (torch) and both exports. Writes
benchmarks/results/mod_quant.json: accuracy of each, and how many answers the GPTQ checkpoint
and its QMoE export share.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks import harness


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS / "mod_quant.json",
                        work=Path("runs/mod_quant"), threads=1)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    gptq, gptq_onnx, rtn_onnx = w / "gptq4", w / "gptq4-onnx", w / "float-int4-onnx"
    result = {"model": harness.relative(args.model)}
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
        result[name] = harness.run_step(cmd, skip_if=out).to_dict()
    for name, out in (("export_gptq", gptq_onnx), ("export_float_int4", rtn_onnx)):
        manifest = json.loads((out / "edgevlm.json").read_text())
        result[name].update(parity=manifest.get("parity"), decoder=manifest.get("decoder"),
                            int4_source=manifest.get("int4_source"))
    report = w / "bench"
    cmd = ["edgevlm", "bench", str(args.model), str(gptq), str(gptq_onnx), str(rtn_onnx),
           "--data", str(args.data / "eval.json"), "--max-new-tokens", "8", "--threads",
           str(args.threads), "--report", str(report), "--overwrite", "--quiet"]
    result["bench"] = harness.run_step(cmd).to_dict()
    bench = json.loads((report / "bench.json").read_text())
    result["targets"] = [{k: t.get(k) for k in ("name", "path", "backend", "precision",
                                                "accuracy", "decode_tokens_per_s", "disk_bytes")}
                         for t in bench["targets"]]
    answers = {t["path"]: [p["prediction"] for p in t["predictions"]] for t in bench["targets"]}
    a, b = answers[str(gptq)], answers[str(gptq_onnx)]
    result["gptq_torch_vs_qmoe_export_identical"] = f"{sum(x == y for x, y in zip(a, b))} of " \
                                                    f"{len(a)}"
    harness.write(args.out, result, record=record)
    print(json.dumps({k: v for k, v in result.items() if k != "export_gptq"}, indent=1,
                     default=str))


if __name__ == "__main__":
    main()
