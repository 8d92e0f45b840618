"""Phone-NPU readiness of the tiny presets: plain export against `--profile mobile`.

For each preset (tiny-teacher, tiny-student) this builds an untrained model with the real CLI
(`edgevlm data shapes`, `edgevlm init`), exports it twice (`edgevlm export` with the default
profile, and with `--profile mobile`), and measures every graph with onnxruntime's
check_onnx_model_mobile_usability logic (edgevlm.export.readiness): the share of nodes NNAPI,
CoreML NeuralNetwork and CoreML MLProgram would take and in how many partitions. Readiness is a
property of the graph's ops and shapes, so random weights measure it as well as trained ones.
The mobile export also checks parity with torch (fp16) and its figures are read back from
edgevlm.json, the file a user's export carries.

  python benchmarks/device_readiness.py [--workdir DIR]
Writes benchmarks/results/device_readiness.json and .md (the table in docs/devices.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRESETS = ("tiny-teacher", "tiny-student")
COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgevlm.cli", *args, "--quiet"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _plain_readiness(export_dir: Path) -> dict:
    from edgevlm.export.readiness import measure

    manifest = json.loads((export_dir / "edgevlm.json").read_text())
    graphs = {c: export_dir / manifest["components"][c]["file"] for c in COMPONENTS}
    return measure(graphs).to_dict()


def run(work: Path) -> dict:
    _cli("data", "shapes", str(work / "shapes"), "--train", "32", "--eval", "8")
    out = {}
    for preset in PRESETS:
        model = work / preset
        _cli("init", str(model), "--preset", preset, "--tokenizer-data",
             str(work / "shapes" / "train.json"))
        plain, mobile = work / f"{preset}-plain", work / f"{preset}-mobile"
        _cli("export", str(model), "--out", str(plain), "--no-validate")
        t = time.time()
        _cli("export", str(model), "--out", str(mobile), "--profile", "mobile")
        seconds = time.time() - t
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        presets = run(work)
    results = {"command": "python benchmarks/device_readiness.py",
               "argv": shlex.join(sys.argv), "onnxruntime": onnxruntime.__version__,
               "python": platform.python_version(), "presets": presets}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_readiness.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "device_readiness.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
