"""Quantization methods on the real LM: RTN, GPTQ and Q-VLM (with and without its vision-side
step) on the trained SmolLM2-135M VQA model (runs/smollm2-llava, benchmarks.smollm2.vqa).

    nice python -m benchmarks.smollm2.quant [--calib-samples 64] [--seeds 0] [--bits 4]
        [--group-size 128] [--limit 300]

(the `quant` step of the chain, `python -m benchmarks.smollm2 quant`, runs it at these defaults)

Each row is the CLI a user types: `edgevlm quantize runs/smollm2-llava --method M --bits B
--group-size G --symmetric --calib runs/shapes/train.json --calib-samples N --seed S`, timed,
then `edgevlm eval` of the checkpoint for perplexity on the first 8192 tokens of runs/pydoc.txt
(`edgevlm data pydoc`) and greedy accuracy on the first --limit questions of
runs/shapes/eval.json. Text calibration (`--calib-text runs/pydoc.txt`) takes its windows from
the file's end, far from the 8192 scored tokens at its start. Group 128 does not divide
SmolLM2's 576-wide layers, so the checkpoint holds group 64 there (quant_report.json says so).
The float model is evaluated the same way.

Other models: `--model runs/teacher --out benchmarks/results/qvlm_vision_teacher.json --no-text
--methods GPTQ "Q-VLM, no vision step" "Q-VLM, vision step" --seeds 0 1 2` (the shapes teacher,
whose LM never saw real text, so no perplexity), the same for the CLIP + Llama model.

The weights came from a Q4_1 GGUF (asymmetric 4-bit, blocks of 32): symmetric g64 is off that
grid, so no method gets a free exact fit. Writes benchmarks/results/smollm2_quant.json (a rerun
keeps the rows already there); the quantized folders go to --work.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import ROOT

IMAGES, TEXT = "{images}", "{text}"  # calibration: shapes train.json, or the text's end
METHODS = {  # row name -> quantize arguments
    "RTN": ["--method", "rtn"],
    "GPTQ": ["--method", "gptq", "--calib", IMAGES],
    "Q-VLM, no vision step": ["--method", "qvlm", "--no-vision-opt", "--calib", IMAGES],
    "Q-VLM, vision step": ["--method", "qvlm", "--vision-opt", "--calib", IMAGES],
    "GPTQ, text calibration": ["--method", "gptq", "--calib-text", TEXT],
    "Q-VLM, text calibration": ["--method", "qvlm", "--calib-text", TEXT],
    "GPTQ, images + text": ["--method", "gptq", "--calib", IMAGES, "--calib-text", TEXT],
    "Q-VLM, images + text": ["--method", "qvlm", "--calib", IMAGES, "--calib-text", TEXT],
    "Q-VLM uniform blocks, images + text": ["--method", "qvlm", "--partition", "uniform",
                                            "--calib", IMAGES, "--calib-text", TEXT],
    "Q-VLM layer-wise, images + text": ["--method", "qvlm", "--max-block", "1",
                                        "--calib", IMAGES, "--calib-text", TEXT],
}


def table(results: dict) -> str:
    """The results as a markdown table: one row per setting and method, seeds pooled (mean and
    sample s.d. of accuracy; perplexity and time likewise), and the vision step's choice."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for key, row in results["rows"].items():
        setting, method = ("FP", "FP") if key == "FP" else tuple(key.split(" | ")[:2])
        groups.setdefault((setting, method), []).append(row)

    def cell(values, fmt):
        if not values:
            return "–"
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

    lines = ["| setting | method | accuracy % | perplexity | quantize s | vision step kept "
             "(steps, held-out KL before → after) | seeds |", "|---|---|---|---|---|---|---|"]
    fp_ppl = (results["rows"].get("FP", {}).get("eval", {}).get("perplexity") or {}).get(
        "perplexity")
    for (setting, method), rows in groups.items():
        acc = [100 * r["eval"]["accuracy"] for r in rows]
        ppl = [r["eval"]["perplexity"]["perplexity"] for r in rows if r["eval"].get("perplexity")]
        secs = [r["seconds"] for r in rows if r.get("seconds")]
        ppl_cell = cell(ppl, "{:.2f}")
        if ppl and fp_ppl and method != "FP":
            ppl_cell += f" ({100 * (statistics.mean(ppl) / fp_ppl - 1):+.0f}%)"
        vis = [r.get("vision_opt") for r in rows if isinstance(r.get("vision_opt"), dict)]
        vis_cell = "; ".join(f"{v['steps_kept']}, {1e3 * v['heldout_kl_before']:.1f} → "
                             f"{1e3 * v['heldout_kl_after']:.1f}" for v in vis) or "–"
        lines.append(f"| {setting} | {method} | {cell(acc, '{:.1f}')} | {ppl_cell} | "
                     f"{cell(secs, '{:.0f}')} | {vis_cell} | {len(rows)} |")
    return "\n".join(lines) + "\n\nHeld-out KL in 10⁻³ nats per answer token.\n"


def evaluate(folder: Path, args, out: Path) -> dict:
    cmd = ["edgevlm", "eval", str(folder), str(args.data / "eval.json"),
           "--limit", str(args.limit), "--max-new-tokens", "8", "--quiet", "--json", str(out)]
    if not args.no_text:
        cmd += ["--text", str(args.text), "--max-tokens", "8192"]
    harness.run_step(cmd)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS / "smollm2_quant.json",
                       work=Path("/tmp/edgevlm_smollm2_quant"))
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "shapes")
    p.add_argument("--text", type=Path, default=ROOT / "runs" / "pydoc.txt")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--scale-rule", default="absmax", choices=["absmax", "signed"],
                   help="signed: llama.cpp's Q4_0 scale rule (the setting says so)")
    p.add_argument("--asymmetric", action="store_true",
                   help="asymmetric integers (an integer zero point per group)")
    p.add_argument("--act-bits", type=int, default=16,
                   help="8: W4A8 with activations fake-quantized (simulated, as the label says)")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--layer-bits", default=None,
                   help="mixed precision, passed to quantize (e.g. v_proj=8); names the setting")
    p.add_argument("--no-text", action="store_true",
                   help="skip the perplexity (a model whose LM never saw real text)")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = harness.load(args.out, {"rows": {}})

    def save():
        harness.write(args.out, results, table(results), record)

    if "FP" not in results["rows"]:
        results["rows"]["FP"] = {"eval": evaluate(args.model, args, args.work / "fp.json")}
        save()
    kind = "asymmetric" if args.asymmetric else "symmetric"
    setting = f"W{args.bits} g{args.group_size} {kind}"
    if args.act_bits != 16:
        setting = f"W{args.bits}A{args.act_bits} (simulated) g{args.group_size} {kind}"
    if args.scale_rule != "absmax":
        setting += f" {args.scale_rule}"
    if args.layer_bits:
        setting += f" {args.layer_bits}"
    for method in args.methods:
        for seed in ([0] if method == "RTN" else args.seeds):
            key = f"{setting} | {method} | seed {seed} | {args.calib_samples} samples"
            if key in results["rows"]:
                continue
            out = args.work / key.replace(" | ", "_").replace(" ", "-").replace(",", "")
            fill = {IMAGES: str(args.data / "train.json"), TEXT: str(args.text)}
            cmd = ["edgevlm", "quantize", str(args.model), "--out", str(out),
                   *[fill.get(a, a) for a in METHODS[method]],
                   "--bits", str(args.bits), "--group-size", str(args.group_size),
                   "--asymmetric" if args.asymmetric else "--symmetric", "--seed", str(seed),
                   "--overwrite", "--quiet"]
            if args.act_bits != 16:
                cmd += ["--act-bits", str(args.act_bits)]
            if not args.asymmetric:  # named, so a row does not follow the CLI's default
                cmd += ["--scale-rule", args.scale_rule]
            if method != "RTN":
                cmd += ["--calib-samples", str(args.calib_samples)]
            if args.layer_bits:
                cmd += ["--layer-bits", args.layer_bits]
            step = harness.run_step(cmd)
            report = json.loads((out / "quant_report.json").read_text())
            results["rows"][key] = {"command": step.command, "seconds": step.seconds,
                                    "vision_opt": report.get("vision_opt"),
                                    "calibration": {k: v for k, v in report.get(
                                        "calibration", {}).items() if k != "layer_input_entropy"},
                                    "blocks": report.get("blocks"),
                                    "weight_bits_mean": report.get("weight_bits_mean"),
                                    "group_size_note": report.get("group_size_note"),
                                    "eval": evaluate(out, args, out.with_suffix(".eval.json"))}
            save()


if __name__ == "__main__":
    main()
