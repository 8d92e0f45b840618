"""How long `edgevlm quantize` takes on the real LM (issue 15, item 6), one row per method and
edgevlm install, run one after another on the same machine so the rows compare.

    nice python -m benchmarks.quant.quantize_time [--calib-samples 128] [--methods gptq qvlm]
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

import json
import subprocess
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import ROOT


def commit_of(edgevlm: str) -> str:
    """The git commit an edgevlm install was built from: its package's folder, if a checkout."""
    python = Path(edgevlm).with_name("python")
    code = "import edgevlm, os; print(os.path.dirname(edgevlm.__file__))"
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    commit, changed = harness.git_commit(Path(where))
    if commit is None:
        return "installed copy: see its label"
    return commit + ("+changes" if changed else "")


def table(results: dict) -> str:
    lines = ["| install (commit) | method | calibration samples | seconds | block walk s | "
             "blocks | GPTQ guard |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"].values():
        lines.append(f"| {row['install']} ({row['commit']}) | {row['method']} | "
                     f"{row['calib_samples']} | {row['seconds']:.0f} | "
                     f"{row['walk_seconds']:.0f} | {row['blocks']} | {row['guard'] or '–'} |")
    return "\n".join(lines) + f"\n\nCPU: {results['cpu']}\n"


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS / "quantize_time.json",
                       work=Path("/tmp/edgevlm_quantize_time"))
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--calib", type=Path, default=ROOT / "runs" / "shapes" / "train.json")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["gptq", "qvlm"])
    p.add_argument("--edgevlm", nargs="+", default=["this=edgevlm"],
                   help="LABEL=EXECUTABLE of each install to time")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = harness.load(args.out, {"rows": {}})
    results["cpu"] = f"{record.machine['cpu']}, {record.machine['logical_cores']} cores"
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
            step = harness.run_step(cmd)
            report = json.loads((out / "quant_report.json").read_text())
            guard = report.get("gptq_guard")
            results["rows"][key] = {
                "install": label, "commit": commit, "method": method,
                "calib_samples": args.calib_samples, "command": step.command,
                "seconds": step.seconds, "peak_rss_bytes": step.peak_rss_bytes,
                "walk_seconds": sum(b["seconds"] for b in report["block_search"]),
                "blocks": len(report["blocks"]),
                "guard": guard and f"kept {guard['kept']}",
                "group_size": report["group_size"]}
            harness.write(args.out, results, table(results), record)


if __name__ == "__main__":
    main()
