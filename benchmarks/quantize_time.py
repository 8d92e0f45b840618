"""How long `edgevlm quantize` takes on the real LM (issue 15, item 6), one row per method and
edgevlm install, run one after another on the same machine so the rows compare.

    nice python benchmarks/quantize_time.py [--calib-samples 128] [--methods gptq qvlm]
        [--edgevlm LABEL=PATH/TO/edgevlm ...] [--out benchmarks/results/quantize_time.json]

Each row is the command a user types, `edgevlm quantize runs/smollm2-llava --method M
--calib runs/shapes/train.json --calib-samples N` at the defaults (W4, group 128 asked, 64
held, symmetric), wall-clock timed around the whole process (loading and writing included).
`--edgevlm old=/path/venv/bin/edgevlm` times another install (an earlier commit installed in its
own virtual environment) beside this one, to measure a speed-up; every row names its install's
commit. From quant_report.json each row also keeps the time the block walk took and the GPTQ
guard's decision. Writes the JSON and a markdown table beside it; a rerun keeps rows already
there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]


def commit_of(edgevlm: str) -> str:
    """The git commit an edgevlm install was built from: its package's folder, if a checkout."""
    python = Path(edgevlm).with_name("python")
    code = "import edgevlm, os; print(os.path.dirname(edgevlm.__file__))"
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    got = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    if got.returncode != 0:
        return "installed copy: see its label"
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return got.stdout.strip() + ("+changes" if dirty else "")


def table(results: dict) -> str:
    lines = ["| install (commit) | method | calibration samples | seconds | block walk s | "
             "blocks | GPTQ guard |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"].values():
        lines.append(f"| {row['install']} ({row['commit']}) | {row['method']} | "
                     f"{row['calib_samples']} | {row['seconds']:.0f} | "
                     f"{row['walk_seconds']:.0f} | {row['blocks']} | {row['guard'] or '–'} |")
    return "\n".join(lines) + f"\n\nCPU: {results['cpu']}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--calib", type=Path, default=ROOT / "runs" / "shapes" / "train.json")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["gptq", "qvlm"])
    p.add_argument("--edgevlm", nargs="+", default=["this=edgevlm"],
                   help="LABEL=EXECUTABLE of each install to time")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgevlm_quantize_time"))
    p.add_argument("--out", type=Path, default=RESULTS / "quantize_time.json")
    args = p.parse_args()
    from edgevlm.bench.report import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    results["command"] = "nice " + shlex.join(["python", "benchmarks/quantize_time.py",
                                               *map(str, __import__("sys").argv[1:])])
    machine = machine_info()
    results["cpu"] = f"{machine.cpu}, {machine.logical_cores} cores"
    for spec in args.edgevlm:
        label, _, exe = spec.partition("=")
        exe = exe or label
        resolved = subprocess.run(["which", exe], capture_output=True, text=True,
                                  check=True).stdout.strip()
        commit = commit_of(resolved)
        for method in args.methods:
            key = f"{label} {commit} | {method} | {args.calib_samples}"
            if key in results["rows"]:
                continue
            out = args.work / f"{label}-{method}-{args.calib_samples}"
            cmd = [resolved, "quantize", str(args.model), "--out", str(out), "--method", method,
                   "--calib", str(args.calib), "--calib-samples", str(args.calib_samples),
                   "--overwrite", "--quiet"]
            print("+", shlex.join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True)
            seconds = time.time() - t0
            report = json.loads((out / "quant_report.json").read_text())
            guard = report.get("gptq_guard")
            results["rows"][key] = {
                "install": label, "commit": commit, "method": method,
                "calib_samples": args.calib_samples, "command": shlex.join(cmd),
                "seconds": seconds,
                "walk_seconds": sum(b["seconds"] for b in report["block_search"]),
                "blocks": len(report["blocks"]),
                "guard": guard and f"kept {guard['kept']}",
                "group_size": report["group_size"]}
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(f"`{results['command']}`\n\n"
                                                   + table(results))


if __name__ == "__main__":
    main()
