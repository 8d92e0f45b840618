"""`edgevlm export` of the float SmolLM2 LLaVA at every precision, validation on (issue 14).

    python benchmarks/smollm2_exports.py [--model runs/smollm2-llava0] [--workdir DIR]

The subject is runs/smollm2-llava0 (`python benchmarks/smollm2.py make`): the real SmolLM2-135M
under a from-scratch SigLIP tower. Each precision is the CLI command a user types, run as a
subprocess with `--json`; the parity the exporter gated on (and what it only reported) is read
from its edgevlm.json. fp32 must give transformers' greedy tokens exactly with logits max-abs
< 1e-4; a built int8/int4 decoder is gated against torch carrying the same integers (graph_check),
its float-vs-quantized difference reported only. Writes benchmarks/results/smollm2_exports.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-llava0"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgevlm_smollm2_exports"))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing; make it with python benchmarks/smollm2.py make")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/smollm2_exports.py", "model": str(args.model),
              "exports": {}}
    for precision in args.precisions.split(","):
        out = args.workdir / f"export_{precision}"
        cmd = ["edgevlm", "export", str(args.model), "--out", str(out), "--precision", precision,
               "--overwrite", "--quiet"]
        print(f"+ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"command": shlex.join(cmd), "seconds": round(time.time() - t0, 1),
               "exit_code": proc.returncode}
        if proc.returncode:
            row["error"] = (proc.stderr or proc.stdout)[-2000:]
            print(row["error"], file=sys.stderr)
        else:
            row.update(summarize(out))
        result["exports"][precision] = row
        (RESULTS / "smollm2_exports.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {"exit": v["exit_code"], "greedy": v.get("greedy")}
                      for k, v in result["exports"].items()}, indent=1))


if __name__ == "__main__":
    main()
