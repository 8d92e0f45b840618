"""A VQA model on the real LM: SmolLM2-135M under a from-scratch SigLIP tower, LLaVA-1.5 recipe.

    python -m benchmarks.smollm2.vqa [--stage1-steps 150] [--stage2-steps 150]
        [--family llava|smolvlm|qwen2vl]

(the `vqa` step of the chain, `python -m benchmarks.smollm2 vqa`)

`--family smolvlm` makes the same recipe's SmolVLM: preset smolvlm-smollm2 (Idefics3, the
same tower as an Idefics3 tower, pixel shuffle 2, images split 2 x 2 plus the global image:
245 image tokens against the LLaVA's 196), runs/smolvlm-smollm2*, and
benchmarks/results/smolvlm_vqa.json. `--family qwen2vl`: preset qwen2vl-smollm2 (Qwen2-VL: the
SmolLM2 layers as its M-RoPE decoder, a 4-layer tower of 14-px patches; the shapes images grow
to 392 x 392 px, 196 tokens, the LLaVA's count), runs/qwen2vl-smollm2*,
benchmarks/results/qwen2vl_vqa.json.

Stage 1 (`edgevlm train --stage pretrain --train-vision`) trains the projector and the
from-scratch vision tower on the shapes captions with the LM frozen; stage 2 (`--stage sft`) is
a short fine-tune of LM + projector (+ tower) on the shapes questions, at a learning rate low
enough for a pretrained LM. What fits on a 2-core CPU is far less than LLaVA's 558k + 665k
samples; the script records the time each stage took. It then measures:
- shapes accuracy (300 held-out questions) and the blank-image control (same questions, blank
  images: what the LM answers from the question alone);
- perplexity on `pydoc_data` text before and after training, so that forgetting shows.

Every output folder is kept (runs/smollm2-llava = the trained model, the subject of the
quantize / export / speed benchmarks that follow); a rerun skips what exists. Writes
benchmarks/results/smollm2_vqa.json. The weights are not committed; this recipe is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks import harness

# --family -> (runs/ name, init preset, results file)
FAMILIES = {"llava": ("smollm2-llava", "llava-smollm2", "smollm2_vqa.json"),
            "smolvlm": ("smolvlm-smollm2", "smolvlm-smollm2", "smolvlm_vqa.json"),
            "qwen2vl": ("qwen2vl-smollm2", "qwen2vl-smollm2", "qwen2vl_vqa.json")}


def _eval(model: Path, data: Path | None, text: Path | None) -> dict:
    from edgevlm.data import load_samples
    from edgevlm.evaluate import evaluate
    from edgevlm.perplexity import perplexity, read_text
    from edgevlm.quant.act import load_for_eval

    loaded = load_for_eval(model)
    out = {}
    if data is not None:
        r = evaluate(loaded, load_samples(data), max_new_tokens=8, batch_size=16, quiet=True)
        out.update(accuracy=r.accuracy, per_type=r.score.type_accuracy(), eval_seconds=r.seconds)
    if text is not None:
        p = perplexity(loaded, read_text(text), context=512, max_tokens=8192, quiet=True)
        out.update(perplexity=p.perplexity, ppl_tokens=p.tokens_scored)
    return out


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS, out_help="folder for smollm2_vqa.json "
                        "(smolvlm_vqa.json) (default: %(default)s)")
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--stage1-steps", type=int, default=150)
    ap.add_argument("--stage2-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-lr", type=float, default=1e-4)
    ap.add_argument("--family", choices=list(FAMILIES), default="llava")
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    name, preset, results = FAMILIES[args.family]

    import torch

    from benchmarks.smollm2.lm import make
    from edgevlm import train
    from edgevlm.data import load_samples, shapes
    from edgevlm.models import load_model
    from edgevlm.perplexity import pydoc_text

    torch.set_num_threads(2)
    runs = args.runs
    data, blank, text = runs / "shapes", runs / "shapes-blank", runs / "pydoc.txt"
    base, s1, s2 = runs / f"{name}0", runs / f"{name}-stage1", runs / name
    if not data.exists():
        shapes.generate(data, 20000, 300, 0, 48, False)
    if not blank.exists():
        shapes.generate(blank, 1, 300, 0, 48, True)
    if not text.exists():
        text.write_text(pydoc_text(), encoding="utf-8")
    if not base.exists():
        make(base, preset=preset)
    path = args.out / results
    result = harness.load(path)
    result["threads"] = 2

    def save():
        harness.write(path, result, record=record)

    if "before" not in result:
        result["before"] = _eval(base, None, text)
        save()
    for name, src, dst, stage, steps, lr, file in (
            ("stage1", base, s1, "pretrain", args.stage1_steps, args.stage1_lr, "pretrain.json"),
            ("stage2", s1, s2, "sft", args.stage2_steps, args.stage2_lr, "train.json")):
        if not dst.exists():
            cfg = train.TrainConfig(stage=stage, steps=steps, batch_size=args.batch_size, lr=lr,
                                    warmup=min(20, steps // 5), save_every=50, seed=0,
                                    train_vision=True)
            resume = train.latest_checkpoint(dst) is not None
            r, seconds = harness.timed(train.run, load_model(src), load_samples(data / file), dst,
                                       cfg, resume=resume)
            result[name] = {"stage": stage, "steps": steps, "batch_size": args.batch_size,
                            "lr": lr, "data": file, "final_loss": r.final_loss,
                            "seconds": seconds, "resumed_from": r.resumed_from}
            save()
    if "after" not in result:
        result["after"] = _eval(s2, data / "eval.json", text)
        save()
    if "blank_control" not in result:
        result["blank_control"] = _eval(s2, blank / "eval.json", None)
        save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
