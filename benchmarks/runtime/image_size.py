"""A Qwen2-VL export's time to first token against image size, and its decode speed beside a
LLaVA export's, in one run (issue 34, item 7).

Qwen2-VL resizes each image to its own grid (a multiple of 28 px between min_pixels and
max_pixels), so its image tokens, vision encoder time and prefill grow with the image; a LLaVA
resizes every image to its tower's size. For each edge in --sizes (square RGB noise PNGs), the
Qwen2-VL export is loaded with min_pixels lowered to 4 tokens' worth (so a small image stays
small) and max_pixels raised to the largest size, and answers `--repeats` times with 1 new
token; the LLaVA export answers the same images. Then both answer a text question with exactly
--new-tokens tokens (min_new_tokens), and decode tokens per second are compared: the two
decoders are the same SmolLM2 layers, Qwen2-VL's with q/k/v biases and M-RoPE positions.

  python -m benchmarks.runtime.image_size --qwen QWEN_EXPORT --llava LLAVA_EXPORT
      [--sizes 224,448,672,896,1024] [--repeats 5] [--new-tokens 32] [--threads 2] [--out DIR]

Exports as README.md and docs/results/qwen2-vl.md make them (e.g. `edgevlm init smolq
--preset qwen2vl-smollm2 --text-from SmolLM2.gguf; edgevlm export smolq --out smolq-x
--precision int4`, and the SmolLM2 LLaVA int4 export). Speed does not depend on the weights'
values, so untrained models measure what trained ones would. Medians after one warm-up call.
Writes image_size.json and .md into --out (default benchmarks/results).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks import harness

QUESTION = "What color is the shape in the middle of the picture?"
TEXT = "Write a short story about a lighthouse keeper."


def make_image(work: Path, edge: int) -> Path:
    import numpy as np
    from PIL import Image

    path = work / f"noise_{edge}.png"
    if not path.exists():
        rng = np.random.default_rng(edge)
        Image.fromarray(rng.integers(0, 256, (edge, edge, 3), dtype=np.uint8)).save(path)
    return path


def ttft(vlm, image: Path, repeats: int) -> dict:
    calls = [vlm.generate(image, QUESTION, max_new_tokens=1, min_new_tokens=1).timings
             for _ in range(repeats + 1)][1:]
    return {"prompt_tokens": calls[0].n_prompt_tokens,
            **{k: statistics.median(getattr(t, k) for t in calls) * 1e3
               for k in ("ttft_s", "vision_s", "prefill_s")}}


def decode_rate(vlm, new_tokens: int, repeats: int) -> float:
    rates = [vlm.generate(None, TEXT, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens).timings.decode_tokens_per_s
             for _ in range(repeats + 1)][1:]
    return statistics.median(rates)


def markdown(r: dict) -> str:
    lines = ["| image | Qwen2-VL image tokens | Qwen2-VL TTFT ms | vision ms | prefill ms | "
             "LLaVA TTFT ms | Qwen2-VL / LLaVA |", "|---|---:|---:|---:|---:|---:|---:|"]
    for edge, row in r["sizes"].items():
        q, ll = row["qwen2_vl"], row["llava"]
        lines.append(f"| {edge} x {edge} | {row['image_tokens']} | {q['ttft_s']:.0f} | "
                     f"{q['vision_s']:.0f} | {q['prefill_s']:.0f} | {ll['ttft_s']:.0f} | "
                     f"{q['ttft_s'] / ll['ttft_s']:.2f}x |")
    d = r["decode"]
    lines += ["", f"Decode, {r['new_tokens']} tokens of a text answer: Qwen2-VL "
              f"{d['qwen2_vl']:.1f} tok/s, LLaVA {d['llava']:.1f} tok/s "
              f"({d['qwen2_vl'] / d['llava']:.2f}x).", "",
              f"LLaVA resizes every image to its tower's {r['llava_image_tokens']} tokens; "
              f"Qwen2-VL loaded with min_pixels {r['min_pixels']}, max_pixels {r['max_pixels']}. "
              f"Medians of {r['repeats']} calls after a warm-up, {r['threads']} intra-op "
              "threads, CPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, out=harness.RESULTS, threads=2)
    parser.add_argument("--qwen", type=Path, required=True, help="a Qwen2-VL export")
    parser.add_argument("--llava", type=Path, required=True, help="a LLaVA export")
    parser.add_argument("--sizes", default="224,448,672,896,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    from edgevlm.cli.common import quiet_libraries
    from edgevlm.runtime import VLM

    quiet_libraries()
    sizes = [int(s) for s in args.sizes.split(",")]
    lo, hi = 28 * 28 * 4, max(sizes) ** 2
    qwen = VLM.load(args.qwen, provider="cpu", threads=args.threads, min_pixels=lo,
                    max_pixels=hi)
    llava = VLM.load(args.llava, provider="cpu", threads=args.threads)
    work = Path(tempfile.mkdtemp(prefix="image_size_"))
    r = {"qwen_export": harness.relative(str(args.qwen)),
         "llava_export": harness.relative(str(args.llava)), "threads": args.threads,
         "repeats": args.repeats, "new_tokens": args.new_tokens, "min_pixels": lo,
         "max_pixels": hi, "llava_image_tokens": llava.info.num_image_tokens, "sizes": {}}
    for edge in sizes:
        image = make_image(work, edge)
        q, ll = ttft(qwen, image, args.repeats), ttft(llava, image, args.repeats)
        family = qwen.info.patch_family
        tokens = family.tokens(family.pixels(image, "float32")[1])
        r["sizes"][edge] = {"image_tokens": tokens, "qwen2_vl": q, "llava": ll}
        print(f"{edge}: done", flush=True)
    r["decode"] = {"qwen2_vl": decode_rate(qwen, args.new_tokens, args.repeats),
                   "llava": decode_rate(llava, args.new_tokens, args.repeats)}
    harness.write(args.out / "image_size", r, markdown(r), record)
    print(markdown(r))


if __name__ == "__main__":
    main()
