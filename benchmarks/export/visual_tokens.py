"""The accuracy / latency curve of visual token reduction: `edgevlm export --visual-tokens N
--token-select METHOD` for N from all the tower's tokens down to 1, each method, benched in one
run beside the torch model.

    nice python -m benchmarks.export.visual_tokens --model runs/teacher --data runs/shapes \
        [--precision fp32|int4] [--limit 300] [--name teacher] \
        [--finetune-tokens N --finetune-steps S [--finetune-lr LR]]

With --finetune-tokens, the model is also trained S more steps (sft, on DATA/train.json) at N
divprune tokens (`edgevlm train --visual-tokens N`) and its export is benched beside the
training-free points: what the training-free methods cost against a model that learned the
reduced count.

Per point: accuracy on the first --limit questions of DATA/eval.json, median time to first
token with the image (`edgevlm bench`, 1 warm-up, 3 timed answers to each of 4 questions) and the
decoder's prefill FLOPs for that prompt (2 · decoder weights · S for the matmuls plus
4 · layers · S² · width for attention, S the prompt length with N image tokens).

Each method is exported once with `--visual-tokens` at the smallest N; the other N of that
method are copies of that export whose edgevlm.json says another N (the flag changes nothing
else: the graphs are the same, `tests/runtime/test_token_select.py`). Writes
visual_tokens_NAME.{json,md,png} into --out (benchmarks/results); the bench reports stay in
--work, for `edgevlm plan`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks import harness

METHODS = ("divprune", "visionzip")


def token_counts(full: int) -> list[int]:
    """All, then halving down to 1 (and the quarter point exactly)."""
    counts, n = {full, max(1, full // 4)}, full
    while n > 1:
        n = max(1, n // 2)
        counts.add(n)
    return sorted(counts, reverse=True)


def prefill_flops(config: dict, prompt_tokens: int) -> float:
    t = config["text_config"]
    d, layers, inter = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"]
    heads, kv = t["num_attention_heads"], t.get("num_key_value_heads", t["num_attention_heads"])
    head_dim = t.get("head_dim") or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * inter
    s = prompt_tokens
    return 2.0 * layers * per_layer * s + 4.0 * layers * s * s * heads * head_dim


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS, work=Path("/tmp/edgevlm_visual_tokens"))
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--name", required=True)
    p.add_argument("--finetune-tokens", type=int)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.model / "config.json").read_text())

    from edgevlm.models import load_model

    full = load_model(args.model).num_image_tokens
    counts = token_counts(full)
    targets = []
    for method in METHODS:
        base = work / f"{method}-{counts[-1]}"
        if not base.exists():
            cmd = ["edgevlm", "export", str(args.model), "--out", str(base), "--precision",
                   args.precision, "--visual-tokens", str(counts[-1]), "--token-select", method,
                   "--quiet"]
            harness.run_step(cmd)
        for n in counts[:-1]:
            out = work / f"{method}-{n}"
            if not out.exists():
                shutil.copytree(base, out)
                manifest = json.loads((out / "edgevlm.json").read_text())
                manifest["num_image_tokens"] = n
                manifest["token_select"] = {"method": method, "tokens": n}
                (out / "edgevlm.json").write_text(json.dumps(manifest, indent=1))
            targets.append(out)
        targets.append(base)
    tuned_name = None
    if args.finetune_tokens:
        tuned = work / f"finetuned-{args.finetune_tokens}-model"
        tuned_name = f"finetuned-{args.finetune_tokens}"
        if not tuned.exists():
            cmd = ["edgevlm", "train", str(args.model), str(args.data / "train.json"), "--out",
                   str(tuned), "--stage", "sft", "--steps", str(args.finetune_steps), "--lr",
                   str(args.finetune_lr), "--batch-size", "8", "--visual-tokens",
                   str(args.finetune_tokens), "--quiet"]
            harness.run_step(cmd)
        if not (work / tuned_name).exists():
            cmd = ["edgevlm", "export", str(tuned), "--out", str(work / tuned_name),
                   "--precision", args.precision, "--quiet"]
            harness.run_step(cmd)
        targets.append(work / tuned_name)
    report = work / "report"
    cmd = ["edgevlm", "bench", str(args.model), *map(str, targets), "--data",
           str(args.data / "eval.json"), "--limit", str(args.limit), "--max-new-tokens", "8",
           "--report", str(report), "--overwrite", "--quiet"]
    harness.run_step(cmd)
    bench = json.loads((report / "bench.json").read_text())
    by_name = {t["name"]: t for t in bench["targets"]}
    torch_row = by_name[args.model.name]
    rows = []
    for method in METHODS:
        for n in counts:
            t = by_name[f"{method}-{n}"]
            rows.append({"method": method, "tokens": n, "share": n / full,
                         "accuracy": t["accuracy"], "ttft_ms": 1e3 * t["ttft_s"]["median"],
                         "prompt_tokens": t["n_prompt_tokens"],
                         "prefill_gflops": prefill_flops(config, t["n_prompt_tokens"]) / 1e9})
    if tuned_name:
        t = by_name[tuned_name]
        rows.append({"method": f"divprune, fine-tuned {args.finetune_steps} steps",
                     "tokens": args.finetune_tokens, "share": args.finetune_tokens / full,
                     "accuracy": t["accuracy"], "ttft_ms": 1e3 * t["ttft_s"]["median"],
                     "prompt_tokens": t["n_prompt_tokens"],
                     "prefill_gflops": prefill_flops(config, t["n_prompt_tokens"]) / 1e9})
    result = {"model": harness.relative(args.model), "precision": args.precision,
              "full_tokens": full,
              "torch": {"accuracy": torch_row["accuracy"],
                        "ttft_ms": 1e3 * torch_row["ttft_s"]["median"]},
              "report": str(report / "bench.json"), "rows": rows}
    stem = args.out / f"visual_tokens_{args.name}"
    full_acc = {r["method"]: r["accuracy"] for r in rows if r["tokens"] == full}
    full_acc.update({r["method"]: full_acc["divprune"] for r in rows
                     if r["method"] not in full_acc})
    lines = [f"{args.precision} export, {bench['n_samples']} questions; torch fp32: accuracy "
             f"{100 * torch_row['accuracy']:.1f}%, TTFT {result['torch']['ttft_ms']:.1f} ms", "",
             "| method | image tokens | share | accuracy % | of full | TTFT ms | × torch TTFT | "
             "prefill GFLOPs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = r["accuracy"] / full_acc[r["method"]] if full_acc[r["method"]] else float("nan")
        lines.append(f"| {r['method']} | {r['tokens']} | {100 * r['share']:.0f}% | "
                     f"{100 * r['accuracy']:.1f} | {100 * kept:.0f}% | {r['ttft_ms']:.1f} | "
                     f"{r['ttft_ms'] / result['torch']['ttft_ms']:.2f} | "
                     f"{r['prefill_gflops']:.3f} |")
    harness.write(stem, result, "\n".join(lines), record)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({r["method"] for r in rows}, key=lambda m: len(m)):
            pts = [r for r in rows if r["method"] == method]
            ax.plot([r["ttft_ms"] for r in pts], [100 * r["accuracy"] for r in pts], "o-",
                    label=method)
            for r in pts:
                ax.annotate(str(r["tokens"]), (r["ttft_ms"], 100 * r["accuracy"]), fontsize=6)
        ax.set_xlabel("time to first token with image (ms, median)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{args.name}: image tokens kept (labels)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem.with_name(stem.name + ".png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
