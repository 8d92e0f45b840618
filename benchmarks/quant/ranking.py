"""One table of every quantizer run on the trained SmolLM2 LLaVA: edgevlm's (RTN, GPTQ, Q-VLM;
benchmarks.smollm2.quant) beside llama.cpp's own (Q4_0, Q4_K_M, Q3_K_M;
benchmarks.quant.llamacpp), all scored by the same `edgevlm eval` (perplexity on the first
8192 tokens of runs/pydoc.txt, greedy accuracy on 300 shapes questions), with the bits per
weight of the decoder layers each actually stores.

    python -m benchmarks.quant.ranking

Bits per weight count a 16-bit scale per group for ours (compressed-tensors stores the model's
float dtype; 16 bits is what a deployed fp16/bf16 checkpoint and MatMulNBits carry) and the
block formats' own sizes for llama.cpp. Our "g128" holds group 64 on SmolLM2's 576-wide inputs
(the largest power of two dividing 576) and 128 on the 1536-wide down_proj. Writes
benchmarks/results/smollm2_ranking.{json,md} (--out).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import harness

# SmolLM2-135M decoder layer: (out, in) of q, k, v, o, gate, up, down
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
          "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
          "down_proj": (576, 1536)}


def ours_bpw(bits: int, group: int, asymmetric: bool = False,
             layer_bits: dict[str, int] | None = None) -> float:
    """Decoder bits per weight: the integers (`layer_bits`: {Linear name: bits} where
    --layer-bits set them), a 16-bit scale per group, and (asymmetric) a `bits`-wide zero point
    per group, as compressed-tensors packs it."""
    total = sum(n * k for n, k in SHAPES.values())
    stored = 0.0
    for name, (n, k) in SHAPES.items():
        b = (layer_bits or {}).get(name, bits)
        g = group
        while k % g:  # the checkpoint's group: the largest power of two <= group dividing k
            g //= 2
        stored += n * k * b + n * k / g * (16 + (b if asymmetric else 0))
    return stored / total


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS / "smollm2_ranking",
                       out_help="results stem: writes STEM.json and STEM.md (default: "
                                "%(default)s)")
    p.add_argument("--results", type=Path, default=harness.RESULTS,
                   help="folder of the quantize results read (default: %(default)s)")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    src = args.results
    ours = json.loads((src / "smollm2_quant.json").read_text())
    # runs kept in files of their own (run beside the main one): --scale-rule signed, W4A8
    for extra in sorted(src.glob("smollm2_quant_*.json")):
        ours["rows"].update({k: v for k, v in json.loads(extra.read_text())["rows"].items()
                             if k != "FP"})
    theirs = json.loads((src / "llamacpp_quant.json").read_text())
    fp = ours["rows"]["FP"]["eval"]
    fp_ppl = fp["perplexity"]["perplexity"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, row in ours["rows"].items():
        if key == "FP":
            continue
        setting, method = key.split(" | ")[:2]
        groups.setdefault((setting, method), []).append(row)
    rows = [{"setting": "FP", "method": "float32", "bits_per_weight": 32.0,
             "accuracy": fp["accuracy"], "perplexity": fp_ppl, "quantize_seconds": None,
             "runs": 1}]
    for (setting, method), runs in groups.items():
        bits = int(setting.split()[0].split("A")[0][1:])
        group = int(setting.split(" g")[1].split()[0])
        layer_bits = {n: int(b) for n, b in (t.split("=") for t in setting.replace(",", " ")
                                             .split() if "=" in t)}
        # rows made before the signed rule existed name no rule: theirs was absmax
        rows.append({"setting": f"{setting} absmax" if setting.endswith(" symmetric")
                     else setting, "method": f"edgevlm {method}",
                     "bits_per_weight": ours_bpw(bits, group, "asymmetric" in setting,
                                                 layer_bits),
                     "accuracy": statistics.mean(r["eval"]["accuracy"] for r in runs),
                     "perplexity": statistics.mean(r["eval"]["perplexity"]["perplexity"]
                                                   for r in runs),
                     "quantize_seconds": statistics.mean(r["seconds"] for r in runs),
                     "runs": len(runs)})
    for qtype, row in theirs["rows"].items():
        if qtype != "F32":
            rows.append({"setting": f"llama.cpp {qtype}", "method": "llama-quantize (data-free)",
                         "bits_per_weight": row["decoder_bpw"],
                         "accuracy": row["eval"]["accuracy"],
                         "perplexity": row["eval"]["perplexity"]["perplexity"],
                         "quantize_seconds": row["quantize_seconds"], "runs": 1})
    rows[1:] = sorted(rows[1:], key=lambda r: (-r["bits_per_weight"], line(r, fp_ppl)))
    f32 = theirs["rows"]["F32"]["llama_perplexity"]
    native = {q: r["llama_perplexity"] / f32 - 1 for q, r in theirs["rows"].items() if q != "F32"}
    text = ("From `smollm2_quant.json`, `smollm2_quant_*.json` and `llamacpp_quant.json`:\n\n"
            "| setting | method | decoder bits/weight | accuracy % | perplexity (rise) | "
            "quantize s | runs |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(line(r, fp_ppl) for r in rows) + "\n\n"
            f"llama-perplexity's own rise on the same text (context 512, F32 {f32:.2f}): "
            + "; ".join(f"{q} {v:+.1%}" for q, v in native.items()) + ".\n")
    harness.write(args.out, {"fp_perplexity": fp_ppl, "rows": rows,
                             "llama_perplexity_rise": native}, text, record)
    print(text)


def line(r: dict, fp_ppl: float) -> str:
    """One row of the table."""
    if r["setting"] == "FP":
        return (f"| FP | float32 | 32 | {100 * r['accuracy']:.1f} | {r['perplexity']:.2f} | – "
                "| 1 |")
    return (f"| {r['setting']} | {r['method']} | {r['bits_per_weight']:.2f} | "
            f"{100 * r['accuracy']:.1f} | {r['perplexity']:.2f} "
            f"({100 * (r['perplexity'] / fp_ppl - 1):+.1f}%) | {r['quantize_seconds']:.0f} "
            f"| {r['runs']} |")


if __name__ == "__main__":
    main()
