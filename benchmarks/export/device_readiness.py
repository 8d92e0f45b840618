"""Phone-NPU readiness of the tiny presets: plain export against `--profile mobile`.

For each preset (tiny-teacher, tiny-student) this builds an untrained model with the real CLI
(`edgevlm data shapes`, `edgevlm init`), exports it twice (`edgevlm export` with the default
profile, and with `--profile mobile`), and measures every graph with onnxruntime's
check_onnx_model_mobile_usability logic (edgevlm.export.readiness): the share of nodes NNAPI,
CoreML NeuralNetwork and CoreML MLProgram would take and in how many partitions. Readiness is a
property of the graph's ops and shapes, so random weights measure it as well as trained ones.
The mobile export also checks parity with torch (fp16) and its figures are read back from
edgevlm.json, the file a user's export carries.

  python -m benchmarks.export.device_readiness [--work DIR] [--quick --out DIR]
Writes device_readiness.json and .md into --out (benchmarks/results: the table in
docs/devices.md). --quick measures tiny-student alone (about 20 s) and writes into --out or its
work folder, never into benchmarks/results.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks import harness

PRESETS = ("tiny-teacher", "tiny-student")
COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")


def _cli(steps: list[dict], *args: str) -> harness.Step:
    """One `edgevlm` command, timed; its record appended to `steps`."""
    step = harness.run_step([sys.executable, "-m", "edgevlm.cli", *args, "--quiet"],
                            env={"HF_HUB_OFFLINE": "1"})
    steps.append(step.to_dict())
    return step


def _plain_readiness(export_dir: Path) -> dict:
    from edgevlm.export.readiness import measure

    manifest = json.loads((export_dir / "edgevlm.json").read_text())
    graphs = {c: export_dir / manifest["components"][c]["file"] for c in COMPONENTS}
    return measure(graphs).to_dict()


def run(work: Path, presets=PRESETS, steps: list[dict] | None = None) -> dict:
    steps = [] if steps is None else steps
    _cli(steps, "data", "shapes", str(work / "shapes"), "--train", "32", "--eval", "8")
    out = {}
    for preset in presets:
        model = work / preset
        _cli(steps, "init", str(model), "--preset", preset, "--tokenizer-data",
             str(work / "shapes" / "train.json"))
        plain, mobile = work / f"{preset}-plain", work / f"{preset}-mobile"
        _cli(steps, "export", str(model), "--out", str(plain), "--no-validate")
        seconds = _cli(steps, "export", str(model), "--out", str(mobile), "--profile",
                       "mobile").seconds
        manifest = json.loads((mobile / "edgevlm.json").read_text())
        out[preset] = {"plain": _plain_readiness(plain), "mobile": manifest["readiness"],
                       "mobile_parity": {c: e["max_abs"] for c, e in
                                         manifest["parity"]["components"].items()},
                       "mobile_greedy_equal": manifest["parity"]["greedy"]["matching_prefix"],
                       "mobile_static_shapes": manifest["static_shapes"],
                       "mobile_export_seconds": round(seconds, 1)}
    return out


def markdown(results: dict) -> str:
    from edgevlm.export.readiness import EP_TITLES

    lines = ["| model | component | export | " + " | ".join(EP_TITLES.values()) + " |",
             "|---|---|---|" + "---:|" * len(EP_TITLES)]
    for preset, r in results["presets"].items():
        for component in COMPONENTS:
            for kind in ("plain", "mobile"):
                eps = r[kind]["components"][component]
                cells = [f"{eps[ep]['share']:.0%} in {eps[ep]['partitions']}" for ep in EP_TITLES]
                lines.append(f"| {preset} | {component} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: share of nodes the provider takes, in how many partitions "
                 "(onnxruntime check_onnx_model_mobile_usability; targets: vision encoder >= 95% "
                 "in 1, decoder >= 80% in <= 4).")
    misses = [m for r in results["presets"].values() for m in r["mobile"]["misses"]]
    lines.append("Mobile targets missed: " + ("; ".join(misses) if misses else "none") + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, out=None, out_help="folder for device_readiness.{json,md} "
                            "(default: benchmarks/results; --quick: the work folder)",
                            work=None, quick="tiny-student alone: proves it runs (about 20 s)")
    args = parser.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    import onnxruntime

    work = args.work or Path(tempfile.mkdtemp(prefix="device_readiness_"))
    work.mkdir(parents=True, exist_ok=True)
    out = harness.out_dir(args, work)
    try:
        steps: list[dict] = []
        presets = run(work, PRESETS[-1:] if args.quick else PRESETS, steps)
        results = {"quick": args.quick, "onnxruntime": onnxruntime.__version__,
                   "presets": presets, "steps": steps}
        harness.write(out / "device_readiness", results, markdown(results), record)
    finally:
        if args.work is None and out != work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
