"""Our built int4 decoder graph against onnxruntime-genai's, one decode step, same session.

    nice python -m benchmarks.runtime.decoder_graph_ab [--steps 300] [--past 80] [--buffer 96]

Both graphs come from benchmarks.runtime.speed's work folder (the SmolLM2 LLaVA's int4 export
and genai's own int4 build of the same weights). Each is run through IOBinding with its KV
buffers bound as past and present (the way both runtimes call them), 2 intra-op threads, at the
same past length; steps alternate between the two graphs so machine drift hits both. Prints the
median step of each and their ratio: the graph cost alone, without either runtime's loop.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import harness

WORK = Path("/tmp/edgevlm_runtime_speed/smollm2")


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    # Two sessions share the process: one's spinning threads would steal the other's cores
    # (each step ran at about twice its solo time with spinning on).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bound(s: ort.InferenceSession, buffer: int, heads: int, dim: int):
    b = s.io_binding()
    kv = [i for i in s.get_inputs() if i.name.startswith("past_key_values.")]
    keep = []
    for i in kv:
        buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, buffer, dim), np.float32))
        keep.append(buf)
        b.bind_ortvalue_input(i.name, buf)
        b.bind_ortvalue_output(i.name.replace("past_key_values", "present"), buf)
    vocab = s.get_outputs()[0].shape[-1]
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, vocab), np.float32))
    b.bind_ortvalue_output("logits", logits)
    return b, keep, logits


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=None, out_help="also write the medians to this .json "
                       "(default: print only)")
    p.add_argument("--ours", type=Path,
                   default=WORK / "export_int4/onnx/decoder_model_merged_q4.onnx")
    p.add_argument("--genai", type=Path, default=WORK / "genai_int4/model.onnx")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--past", type=int, default=80)
    p.add_argument("--buffer", type=int, default=96)
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    ours, genai = session(args.ours), session(args.genai)
    # genai names the head size symbolically ("kv_cache_dim"); ours states both
    _, heads, _, dim = next(i for i in ours.get_inputs() if i.name.startswith("past_")).shape
    bo, bg = bound(ours, args.buffer, heads, dim), bound(genai, args.buffer, heads, dim)
    hidden = ours.get_inputs()[0].shape[-1]
    embeds = np.random.default_rng(0).standard_normal((1, 1, hidden)).astype(np.float32) * 0.05
    mask = np.ones((1, args.past + 1), np.int64)

    def step_ours():
        bo[0].bind_cpu_input("inputs_embeds", embeds)
        bo[0].bind_cpu_input("attention_mask", mask)
        ours.run_with_iobinding(bo[0])

    def step_genai():
        bg[0].bind_cpu_input("input_ids", np.array([[5]], np.int64))
        bg[0].bind_cpu_input("attention_mask", mask)
        genai.run_with_iobinding(bg[0])

    for f in (step_ours, step_genai):
        for _ in range(10):
            f()
    times = {"ours": [], "genai": []}
    for _ in range(args.steps):
        for name, f in (("genai", step_genai), ("ours", step_ours)):
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"past {args.past}, buffer {args.buffer}, {args.steps} alternating steps: "
          f"ours {med['ours']:.3f} ms, genai {med['genai']:.3f} ms, "
          f"genai/ours {med['genai'] / med['ours']:.3f}")
    if args.out is not None:
        harness.write(args.out, {"past": args.past, "buffer": args.buffer, "steps": args.steps,
                                 "median_step_ms": med,
                                 "genai_over_ours": med["genai"] / med["ours"]}, record=record)


if __name__ == "__main__":
    main()
