"""Time to first token of a second question on the same image, with the runtime's image-feature
cache (issue 36, item 4: `VLM.load(..., image_cache_mb=N)`).

For each export, one VLM with the cache (64 MB) and one without answer, in turn, `--repeats`
rounds of:
  uncached   the first question, cache off: the runtime as it was (decode, preprocess, vision
             encoder, prefill)
  first      the same question with the cache on and emptied first: a miss, so the above plus
             hashing the file's bytes (what a miss costs)
  second     another question on the same image file: a hit, no image decode, preprocessing or
             vision encoder
each with 1 new token (TTFT is the call's start to the first token chosen, preprocessing
included). The table gives medians over the rounds, after one untimed warm-up round.

Exports: `tiny` is the tiny-teacher preset with RANDOM weights (SigLIP 48 px, 9 image tokens,
Qwen2 2 layers), exported fp32 here; `--export DIR` adds an export of your own (say a SmolLM2
LLaVA int4 export: 196 image tokens, 30 layers). Speed does not depend on the weights' values.
The image is a 640 x 480 RGB noise PNG (written once into the work folder), so decoding and
resizing cost what a photo's would.

  python -m benchmarks.runtime.image_cache [--export DIR] [--threads 1] [--repeats 9]
      [--work DIR] [--quick --out DIR]
Writes image_cache.json and .md into --out (default benchmarks/results; --quick: 3 rounds on
the tiny export, into the work folder).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks import harness

QUESTIONS = ("<image>\nWhat color is the shape in the middle of the picture?",
             "<image>\nHow many shapes are there?")
CACHE_MB = 64
KINDS = ("uncached", "first", "second")


def build_tiny(work: Path) -> Path:
    """The tiny-teacher preset with random weights, exported fp32 (reused when present)."""
    from benchmarks.runtime.speed import build_model
    from edgevlm.export import ExportConfig, export

    model, out = work / "tiny-model", work / "tiny-export"
    if not (out / "edgevlm.json").exists():
        build_model("tiny-teacher", model)
        export(model, out, ExportConfig(precision="fp32", validate=False))
    return out


def make_image(work: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = work / "noise_640x480.png"
    if not path.exists():
        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def _call(vlm, image: Path, question: str) -> dict:
    t = vlm.generate(image, question, max_new_tokens=1, min_new_tokens=1).timings
    return {"ttft_s": t.ttft_s, "preprocess_s": t.preprocess_s, "vision_s": t.vision_s,
            "prefill_s": t.prefill_s, "image_cached": t.image_cached}


def measure(export_dir: Path, image: Path, threads: int, repeats: int) -> dict:
    """Every round's timings of the three calls, their medians, and the cache's counts."""
    from edgevlm.runtime import VLM

    plain = VLM.load(export_dir, provider="cpu", threads=threads)
    cached = VLM.load(export_dir, provider="cpu", threads=threads, image_cache_mb=CACHE_MB)
    rounds = []
    for i in range(repeats + 1):  # round 0 warms the sessions up and is not kept
        row = {"uncached": _call(plain, image, QUESTIONS[0])}
        cached.image_cache.clear()
        row["first"] = _call(cached, image, QUESTIONS[0])
        row["second"] = _call(cached, image, QUESTIONS[1])
        assert not row["first"]["image_cached"] and row["second"]["image_cached"], row
        if i:
            rounds.append(row)
    medians = {k: {f: statistics.median(r[k][f] for r in rounds)
                   for f in ("ttft_s", "preprocess_s", "vision_s", "prefill_s")} for k in KINDS}
    stats = cached.image_cache.stats()
    info = plain.info
    vision = json.loads((export_dir / "config.json").read_text())["vision_config"]
    return {"export": harness.relative(str(export_dir)), "precision": info.precision,
            "vision_tower": f"{vision['model_type']} {vision['hidden_size']} wide, "
                            f"{vision['num_hidden_layers']} layers, {vision['image_size']} px",
            "image_tokens": info.num_image_tokens, "layers": info.num_layers,
            "feature_bytes": stats.bytes, "threads": threads, "repeats": repeats,
            "median": medians,
            "second_over_first": medians["second"]["ttft_s"] / medians["first"]["ttft_s"],
            "hash_overhead_s": medians["first"]["ttft_s"] - medians["uncached"]["ttft_s"],
            "rounds": rounds}


def markdown(results: dict) -> str:
    lines = ["| export | image tokens | features per image | call | TTFT ms | preprocess ms "
             "| vision ms | prefill ms |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, r in results["exports"].items():
        for kind in KINDS:
            m = r["median"][kind]
            lines.append(f"| {name} ({r['precision']}) | {r['image_tokens']} | "
                         f"{r['feature_bytes'] / 1024:.1f} KiB | {kind} | "
                         f"{m['ttft_s'] * 1e3:.2f} | {m['preprocess_s'] * 1e3:.2f} | "
                         f"{m['vision_s'] * 1e3:.2f} | {m['prefill_s'] * 1e3:.2f} |")
    lines.append("")
    for name, r in results["exports"].items():
        lines.append(f"- {name} (vision tower {r['vision_tower']}): the second question's TTFT "
                     f"is {r['second_over_first']:.2f} x the first's; a miss costs "
                     f"{r['hash_overhead_s'] * 1e3:+.2f} ms against the cache off (hashing the "
                     "file; noise when it is negative).")
    lines.append(f"\nMedians of {results['repeats']} rounds after a warm-up; 1 new token; "
                 f"{results['threads']} intra-op thread(s); cache {CACHE_MB} MB; image "
                 f"{results['image']}. uncached: cache off; first: cache on, a miss; second: "
                 "another question on the same file, a hit.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, out=None, out_help="folder for image_cache.{json,md} "
                            "(default: benchmarks/results; --quick: the work folder)",
                            work=None, quick="3 rounds on the tiny export: proves it runs",
                            threads=1)
    parser.add_argument("--export", type=Path, action="append", default=[],
                        help="an export folder to measure besides the tiny one (repeatable)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default: 9)")
    args = parser.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    from edgevlm.cli.common import quiet_libraries

    quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix="image_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    out = harness.out_dir(args, work)
    repeats = 3 if args.quick else args.repeats
    try:
        image = make_image(work)
        exports = {"tiny": build_tiny(work)}
        exports.update({p.name: p for p in ([] if args.quick else args.export)})
        results = {"quick": args.quick, "threads": args.threads, "repeats": repeats,
                   "cache_mb": CACHE_MB, "image": "640x480 RGB noise PNG, "
                   f"{image.stat().st_size} bytes", "exports": {}}
        for name, path in exports.items():
            results["exports"][name] = measure(path, image, args.threads, repeats)
            print(f"{name}: done", flush=True)
        harness.write(out / "image_cache", results, markdown(results), record)
    finally:
        if args.work is None and out != work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
