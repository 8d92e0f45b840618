"""Why int8 exports store their weights unsigned: the same integers as int8 (s8) and as uint8 with
zero point 128 (u8), in the vision encoder of a full-size SigLIP 224/16 LLaVA built with
transformers alone, on this CPU and on an emulated AVX2 CPU without VNNI (qemu-user, `-cpu
Haswell`), where onnxruntime's u8·s8 kernel sums pairs of products in 16 bits with saturation.

    python -m benchmarks.export.int8_weights [--repeats 20]

Needs `apt-get install qemu-user` for the emulated half (skipped, and said so, without it).
Writes benchmarks/results/int8_weights.json (--out): per representation, MatMulInteger outputs that
differ from the exact integer product of their inputs, the features' distance to this CPU's u8
result, and this CPU's median time per call (s8 / u8 ratio).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

# run in the emulated CPU: the kernel check and the features of one graph
EMULATED = r"""
import json, sys
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from edgevlm.export import vision_int8
path, pixels, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
scratch = Path(out).parent / "scratch"
scratch.mkdir(exist_ok=True)
matmuls, bad = vision_int8._kernel_mismatches(onnx.load(path), pixels, scratch)
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
np.save(out, s.run(None, {"pixel_values": pixels})[0])
print(json.dumps({"matmuls": matmuls, "kernel_mismatches": bad}))
"""


def signed_copy(path: Path, dst: Path) -> None:
    """The graph with its MatMulInteger weights and zero points as int8 (value − 128)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            for name in (node.input[1], node.input[3]):
                a = numpy_helper.to_array(inits[name]).astype(np.int16) - 128
                inits[name].CopyFrom(numpy_helper.from_array(a.astype(np.int8), name))
    onnx.save(model, str(dst))


def timed(path: Path, pixels: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {"pixel_values": pixels})[0]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, {"pixel_values": pixels})
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main(argv=None) -> int:
    ap = harness.parser(__doc__, out=harness.RESULTS / "int8_weights.json")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    from edgevlm.export import ExportConfig, export
    from edgevlm.export.validate import validation_pixels
    from edgevlm.models import load_model
    from tests.export.hf_llava import FULL_VISION, build

    tmp = Path(tempfile.mkdtemp(prefix="int8w-"))
    try:
        build(tmp / "model", FULL_VISION)
        export(tmp / "model", tmp / "x", ExportConfig(precision="int4", vision_precision="int8"))
        pixels = validation_pixels(load_model(tmp / "model"))["pixel_values"].numpy()
        np.save(tmp / "pixels.npy", pixels)
        graphs = {"u8": tmp / "x" / "onnx" / "vision_encoder_int8.onnx", "s8": tmp / "s8.onnx"}
        signed_copy(graphs["u8"], graphs["s8"])
        native = {k: timed(p, pixels, args.repeats) for k, p in graphs.items()}
        rows = {k: {"native_seconds": t,
                    "native_max_abs_vs_u8": float(np.abs(o - native["u8"][0]).max())}
                for k, (o, t) in native.items()}
        qemu = shutil.which("qemu-x86_64")
        for k, p in graphs.items():
            if qemu is None:
                rows[k]["emulated"] = ("skipped: qemu-x86_64 not installed "
                                       "(apt-get install qemu-user)")
                continue
            out = tmp / f"{k}-emulated.npy"
            run = harness.run_step([qemu, "-cpu", "Haswell", sys.executable, "-c", EMULATED, p,
                                    tmp / "pixels.npy", out], capture=True)
            found = json.loads(run.stdout.strip().splitlines()[-1])
            diff = np.abs(np.load(out) - native["u8"][0])
            rows[k]["emulated_haswell"] = {
                **found, "max_abs_vs_native_u8": float(diff.max()),
                "reference_max_abs": float(np.abs(native["u8"][0]).max())}
        import onnxruntime

        result = {"model": "LLaVA built with transformers alone: SigLIP 224/16 (768 wide, 12 "
                           "layers, random weights), vision encoder int8, 2 images",
                  "onnxruntime": onnxruntime.__version__, "weights": rows,
                  "s8_over_u8_time": rows["s8"]["native_seconds"] / rows["u8"]["native_seconds"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    harness.write(args.out, result, record=record)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
