"""`edgevlm export` of the float SmolLM2 LLaVA at every precision, validation on (issue 14).

    python -m benchmarks.smollm2.exports [--model runs/smollm2-llava0] [--work DIR]

(the `exports` step of the chain, `python -m benchmarks.smollm2 exports`). The subject is
runs/smollm2-llava0 (`python -m benchmarks.smollm2 make`): the real SmolLM2-135M
under a from-scratch SigLIP tower. Each precision is the CLI command a user types, run as a
subprocess with `--json`; the parity the exporter gated on (and what it only reported) is read
from its edgevlm.json. fp32 must give transformers' greedy tokens exactly with logits max-abs
< 1e-4; a built int8/int4 decoder is gated against torch carrying the same integers (graph_check),
its float-vs-quantized difference reported only. Writes benchmarks/results/smollm2_exports.json
(--out).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks import harness

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def summarize(out: Path) -> dict:
    """What one export's edgevlm.json says of its decoder and parity."""
    m = json.loads((out / "edgevlm.json").read_text())
    p = m.get("parity") or {}
    g = p.get("greedy") or {}
    return {"decoder": m.get("decoder"),
            "components": {k: {"precision": v.get("precision"), "bytes": v.get("bytes")}
                           for k, v in m["components"].items()},
            "greedy": g,
            "components_error": p.get("components"),
            "graph_check": p.get("graph_check")}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS / "smollm2_exports.json",
                        work=Path("/tmp/edgevlm_smollm2_exports"))
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-llava0"))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing; make it with python -m benchmarks.smollm2 "
                         "make")
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"model": harness.relative(args.model), "exports": {}}
    for precision in args.precisions.split(","):
        out = args.work / f"export_{precision}"
        step = harness.run_step(["edgevlm", "export", args.model, "--out", out, "--precision",
                                 precision, "--overwrite", "--quiet"], capture=True, check=False)
        row = {"command": step.command, "seconds": round(step.seconds, 1),
               "exit_code": step.returncode, "peak_rss_bytes": step.peak_rss_bytes}
        if step.returncode:
            row["error"] = (step.stderr or step.stdout)[-2000:]
            print(row["error"], file=sys.stderr)
        else:
            row.update(summarize(out))
        result["exports"][precision] = row
        harness.write(args.out, result, record=record)
    print(json.dumps({k: {"exit": v["exit_code"], "greedy": v.get("greedy")}
                      for k, v in result["exports"].items()}, indent=1))


if __name__ == "__main__":
    main()
