"""One table of every quantizer run on the trained SmolLM2 LLaVA: edgevlm's (RTN, GPTQ, Q-VLM;
benchmarks/smollm2_quant.py) beside llama.cpp's own (Q4_0, Q4_K_M, Q3_K_M;
benchmarks/llamacpp_quant.py), all scored by the same `edgevlm eval` (perplexity on the first
8192 tokens of runs/pydoc.txt, greedy accuracy on 300 shapes questions), with the bits per
weight of the decoder layers each actually stores.

    python benchmarks/quant_ranking.py

Bits per weight count a 16-bit scale per group for ours (compressed-tensors stores the model's
float dtype; 16 bits is what a deployed fp16/bf16 checkpoint and MatMulNBits carry) and the
block formats' own sizes for llama.cpp. Our "g128" holds group 64 on SmolLM2's 576-wide inputs
(the largest power of two dividing 576) and 128 on the 1536-wide down_proj. Writes
benchmarks/results/smollm2_ranking.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
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


def main() -> None:
    ours = json.loads((RESULTS / "smollm2_quant.json").read_text())
    # runs kept in files of their own (run beside the main one): --scale-rule signed, W4A8
    for extra in sorted(RESULTS.glob("smollm2_quant_*.json")):
        ours["rows"].update({k: v for k, v in json.loads(extra.read_text())["rows"].items()
                             if k != "FP"})
    theirs = json.loads((RESULTS / "llamacpp_quant.json").read_text())
    fp = ours["rows"]["FP"]["eval"]
    fp_ppl = fp["perplexity"]["perplexity"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, row in ours["rows"].items():
        if key == "FP":
            continue
        setting, method = key.split(" | ")[:2]
        groups.setdefault((setting, method), []).append(row)
    lines = ["| setting | method | decoder bits/weight | accuracy % | perplexity (rise) | "
             "quantize s | runs |", "|---|---|---|---|---|---|---|",
             f"| FP | float32 | 32 | {100 * fp['accuracy']:.1f} | {fp_ppl:.2f} | – | 1 |"]
    rows = []
    for (setting, method), runs in groups.items():
        bits = int(setting.split()[0].split("A")[0][1:])
        group = int(setting.split(" g")[1].split()[0])
        acc = statistics.mean(100 * r["eval"]["accuracy"] for r in runs)
        ppl = statistics.mean(r["eval"]["perplexity"]["perplexity"] for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        layer_bits = {n: int(b) for n, b in (t.split("=") for t in setting.replace(",", " ")
                                             .split() if "=" in t)}
        bpw = ours_bpw(bits, group, "asymmetric" in setting, layer_bits)
        # rows made before the signed rule existed name no rule: theirs was absmax
        shown = f"{setting} absmax" if setting.endswith(" symmetric") else setting
        rows.append((bpw, f"| {shown} | edgevlm {method} | {bpw:.2f} | {acc:.1f} | {ppl:.2f} "
                     f"({100 * (ppl / fp_ppl - 1):+.1f}%) | {secs:.0f} | {len(runs)} |"))
    for qtype, row in theirs["rows"].items():
        if qtype == "F32":
            continue
        ev = row["eval"]
        ppl = ev["perplexity"]["perplexity"]
        rows.append((row["decoder_bpw"], f"| llama.cpp {qtype} | llama-quantize (data-free) | "
                     f"{row['decoder_bpw']:.2f} | {100 * ev['accuracy']:.1f} | {ppl:.2f} "
                     f"({100 * (ppl / fp_ppl - 1):+.1f}%) | {row['quantize_seconds']:.0f} | 1 |"))
    lines += [line for _, line in sorted(rows, key=lambda r: (-r[0], r[1]))]
    f32 = theirs["rows"]["F32"]["llama_perplexity"]
    native = "; ".join(f"{q} {r['llama_perplexity'] / f32 - 1:+.1%}"
                       for q, r in theirs["rows"].items() if q != "F32")
    text = ("`python benchmarks/quant_ranking.py` (from `smollm2_quant.json`, "
            "`smollm2_quant_*.json` and `llamacpp_quant.json`)\n\n" + "\n".join(lines) + "\n\n"
            f"llama-perplexity's own rise on the same text (context 512, F32 {f32:.2f}): "
            f"{native}.\n")
    (RESULTS / "smollm2_ranking.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
