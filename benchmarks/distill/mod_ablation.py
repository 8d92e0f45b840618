"""LLaVA-MoD ablation on the shapes task: which part of the MoE recipe carries the gain?

Rows (same teacher, same data, each seed's student starts from the same dense tiny-student):
  kd       dense student, LLaVA-KD's best row (SFT, then DFT with response + visual KL)
  mimic    MoE student, mimic distillation: dense KD -> upcycle (4 experts, top-2, every other
           layer) -> sparse KD + CE + load balance
  pref     mimic, then preference distillation (DPO, beta 0.1, pairs built from the data)
  random   as mimic, but the experts start random instead of as copies (no upcycling)
  top1     as mimic with top-1 routing: the same activated parameters as the dense student
  teacher  the teacher itself
kd, mimic, random and top1 train the same number of optimizer steps; pref adds its own.

Measures, per run: held-out shapes accuracy (greedy, exact match); a POPE-style hallucination
score on a balanced set of "Is there a <colour> <shape>?" questions from a fresh shapes draw
(hallucination = share of "yes" answers to objects that are absent; POPE's accuracy beside it);
total and activated parameters (edgevlm.models.moe.parameter_counts). For seed 0 of each row the
fp32 export's decode speed (runtime, greedy, 1 thread) is measured after the runs, one
model at a time. Mean ± sample std over seeds.

  python -m benchmarks.distill.mod_ablation --teacher runs/teacher --data runs/shapes
  python -m benchmarks.distill.mod_ablation --quick --out /tmp/mod   # a smoke run, ~15 s

Writes mod_ablation.{json,md} into --out (benchmarks/results; --quick: its work folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks import harness

ROWS = {
    "kd": "dense, LLaVA-KD (SFT + DFT, response + visual KL)",
    "mimic": "MoE 4x top-2, mimic (dense KD, upcycle, sparse KD + CE + aux)",
    "pref": "MoE 4x top-2, mimic + preference (DPO)",
    "random": "MoE 4x top-2, mimic without upcycling (random experts)",
    "top1": "MoE 4x top-1, mimic (activated = dense)",
}


def pope_samples(work: Path, n: int):
    """A balanced set of existence questions (half about absent objects) from a fresh draw."""
    from edgevlm.data import load_samples, shapes

    out = work / "pope"
    if not out.exists():  # about one question in seven asks for existence, half of them absent
        shapes.generate(out, n_train=1, n_eval=8 * n, seed=11)
    exist = [s for s in load_samples(out / "eval.json") if s.type == "exist"]
    yes = [s for s in exist if s.answer == "yes"]
    no = [s for s in exist if s.answer == "no"]
    half = min(n // 2, len(yes), len(no))
    return yes[:half] + no[:half]


def pope(model, samples) -> dict:
    from edgevlm.evaluate import evaluate

    preds = evaluate(model, samples, max_new_tokens=4, quiet=True).predictions
    said_yes = [p.prediction.strip().lower().startswith("yes") for p in preds]
    absent = [y for y, p in zip(said_yes, preds) if p.reference == "no"]
    return {"hallucination": sum(absent) / max(1, len(absent)),
            "pope_accuracy": sum(p.correct for p in preds) / len(preds),
            "yes_ratio": sum(said_yes) / len(said_yes)}


def run_row(row, seed, args, work: Path) -> dict:
    from edgevlm.cli.common import quiet_libraries
    from edgevlm.data import load_samples
    from edgevlm.distill import DistillConfig, distill
    from edgevlm.distill.mod import ModConfig, distill_mod
    from edgevlm.evaluate import evaluate
    from edgevlm.models import load_model
    from edgevlm.models.moe import parameter_counts
    from edgevlm.train import TrainConfig

    quiet_libraries()
    half = args.total_steps // 2
    student, data = work / f"student_{seed}", args.data / "train.json"
    out = work / f"{row}_seed_{seed}"
    common = dict(batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                  save_every=10**9, seed=seed)
    t0 = time.time()
    if row == "kd":
        cfg = DistillConfig(stages=("sft", "dft"), train=TrainConfig(steps=half, **common),
                            sft_steps=half, dft_steps=half, w_res=1, w_vis=1, w_rel=0)
        final = distill(args.teacher, student, data, out, cfg, overwrite=True,
                        quiet=True).final_dir
    elif row == "pref":  # continues the same seed's mimic run
        mimic = work / f"mimic_seed_{seed}" / "sparse"
        cfg = ModConfig(stages=("pref",), train=TrainConfig(steps=args.pref_steps, **common))
        res = distill_mod(args.teacher, mimic, data, out, cfg, overwrite=True, quiet=True)
        final = res.final_dir
    else:
        cfg = ModConfig(stages=("dense", "upcycle", "sparse"),
                        train=TrainConfig(steps=half, **common),
                        top_k=1 if row == "top1" else 2,
                        expert_init="random" if row == "random" else "copy")
        final = distill_mod(args.teacher, student, data, out, cfg, overwrite=True,
                            quiet=True).final_dir
    seconds = time.time() - t0
    model = load_model(final)
    held_out = load_samples(args.data / "eval.json")[: args.eval_limit]
    acc = evaluate(model, held_out, quiet=True).accuracy
    result = {"row": row, "seed": seed, "accuracy": acc, **pope(model, pope_samples(
        work, args.pope)), **parameter_counts(model.model), "seconds": seconds,
        "model": str(final)}
    if row == "pref":
        result["pairs"] = json.loads((out / "distill.json").read_text())["pairs"]
    return result


def decode_speed(model_dir: Path, work: Path, samples, new_tokens: int) -> dict:
    """fp32 export of the model, then greedy decode tokens/s over `samples` (1 thread)."""
    from PIL import Image

    from edgevlm.export.exporter import ExportConfig, export
    from edgevlm.runtime import VLM

    out = work / f"export_{model_dir.parent.name}"
    if not out.exists():
        export(model_dir, out, ExportConfig(precision="fp32"), quiet=True)
    vlm = VLM.load(out, threads=1)
    vlm.generate(Image.open(samples[0].image), "warm up", max_new_tokens=4)
    tokens = seconds = 0.0
    for s in samples:
        r = vlm.generate(Image.open(s.image), s.question.replace("<image>", "").strip(),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        tokens += r.timings.n_new_tokens - 1
        seconds += r.timings.decode_s
    return {"decode_tokens_per_s": tokens / seconds, "export": str(out)}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for row in [*ROWS, "teacher"]:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        out[row] = {"name": ROWS.get(row, "the teacher"), "seeds": [r["seed"] for r in rs],
                    "total": rs[0]["total"], "activated": rs[0]["activated"]}
        for key in ("accuracy", "hallucination", "pope_accuracy"):
            out[row][key] = harness.stats(r[key] for r in rs)
    return out


def markdown(report: dict) -> str:
    quick = " (QUICK smoke run: not a result)" if report["quick"] else ""
    lines = [f"# LLaVA-MoD ablation on shapes{quick}", "",
             f"Teacher `{report['teacher']}`. Student preset `{report['student_preset']}`; "
             f"{report['total_steps']} steps per row (pref: + {report['pref_steps']}), batch "
             f"{report['batch_size']}, lr {report['lr']}, seeds {report['seeds']}, "
             f"{report['eval_samples']} held-out questions, {report['pope_samples']} POPE-style "
             "existence questions. Mean ± sample std over seeds [min..max]. Decode: fp32 export, "
             "seed 0, 1 thread" + (" (shared CPU)" if report.get("shared_cpu") else "") + ".",
             "", "| row | student | parameters (activated / total) | accuracy | "
             "hallucination (yes to absent) | POPE accuracy | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for row, s in report["rows"].items():
        a, h, p = s["accuracy"], s["hallucination"], s["pope_accuracy"]
        speed = report.get("decode", {}).get(row, {}).get("decode_tokens_per_s")
        lines.append(f"| {row} | {s['name']} | {s['activated'] / 1e6:.3f}M / "
                     f"{s['total'] / 1e6:.3f}M | {a['mean']:.3f} ± {a['std']:.3f} "
                     f"[{a['min']:.3f}..{a['max']:.3f}] | {h['mean']:.3f} ± {h['std']:.3f} | "
                     f"{p['mean']:.3f} | {f'{speed:.0f}' if speed else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=None, out_help="folder for mod_ablation.{json,md} (default: "
                       "benchmarks/results; --quick: the work folder)", work=None,
                       quick="tiny everything (8 steps, 1 seed, 12 questions): proves it runs",
                       jobs=2, seeds="0,1,2")
    p.add_argument("--teacher", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--student-preset", default="tiny-student")
    p.add_argument("--total-steps", type=int, default=1200)
    p.add_argument("--pref-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rows", default="kd,mimic,pref,random,top1")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--pope", type=int, default=200, help="POPE-style questions (half absent)")
    p.add_argument("--decode-samples", type=int, default=8)
    p.add_argument("--shared-cpu", action="store_true", help="Say in the table that other "
                   "work shared the CPU while it ran")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)

    from edgevlm.data import load_samples
    from edgevlm.distill.stages import load_teacher
    from edgevlm.evaluate import evaluate
    from edgevlm.models import create
    from edgevlm.models.moe import parameter_counts

    work = harness.distill_work(args, "mod_ablation")
    if args.quick:
        args.total_steps, args.pref_steps, args.batch_size, args.warmup = 8, 4, 4, 1
        args.lr, args.seeds, args.eval_limit, args.pope = 3e-3, "0", 12, 12
        args.decode_samples = 2
    elif args.teacher is None or args.data is None:
        p.error("--teacher and --data are required (or --quick)")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r.strip() for r in args.rows.split(",")]
    held_out = load_samples(args.data / "eval.json")[: args.eval_limit]
    teacher = load_teacher(args.teacher)
    runs = [{"row": "teacher", "seed": 0,
             "accuracy": evaluate(teacher, held_out, quiet=True).accuracy,
             **pope(teacher, pope_samples(work, args.pope)),
             **parameter_counts(teacher.model), "seconds": 0.0, "model": str(args.teacher)}]
    print(f"teacher accuracy {runs[0]['accuracy']:.3f}", flush=True)
    for seed in seeds:
        if not (work / f"student_{seed}").exists():
            create(work / f"student_{seed}", preset=args.student_preset,
                   tokenizer_from=args.teacher, seed=seed, vision_from=args.teacher)
    t0 = time.time()

    def describe(job, r):
        pairs = f" pairs {r['pairs']}" if "pairs" in r else ""
        return (f"{r['row']} seed {r['seed']}: accuracy {r['accuracy']:.3f} hallucination "
                f"{r['hallucination']:.3f}{pairs}")

    with harness.pool(args.jobs) as pool:
        done, errors = harness.run_grid(
            run_row, [(r, s, args, work) for r in rows if r != "pref" for s in seeds], pool,
            describe)
        if "pref" in rows:  # continues the mimic runs, so after them
            more, more_errors = harness.run_grid(
                run_row, [("pref", s, args, work) for s in seeds], pool, describe)
            done, errors = done + more, errors + more_errors
    runs += [r for _, r in done]
    decode_set = [s for s in held_out if s.image is not None][: args.decode_samples]
    decode = {}
    for row in [*rows, "teacher"]:
        r = next((x for x in runs if x["row"] == row and x["seed"] == seeds[0]), None)
        if r is None:  # the row failed: its error is in the report
            continue
        decode[row] = decode_speed(Path(r["model"]), work, decode_set, 16)
        print(f"{row}: {decode[row]['decode_tokens_per_s']:.0f} decode tok/s", flush=True)
    report = {"quick": args.quick, "teacher": harness.relative(args.teacher),
              "data": harness.relative(args.data), "student_preset": args.student_preset,
              "total_steps": args.total_steps, "pref_steps": args.pref_steps,
              "batch_size": args.batch_size, "lr": args.lr, "seeds": seeds,
              "eval_samples": len(held_out), "pope_samples": len(pope_samples(work, args.pope)),
              "shared_cpu": args.shared_cpu, "seconds": time.time() - t0,
              "rows": summarize(runs), "decode": decode, "runs": runs, "errors": errors}
    harness.write(harness.out_dir(args, work) / "mod_ablation", report, markdown(report), record)
    print(markdown(report))


if __name__ == "__main__":
    main()
