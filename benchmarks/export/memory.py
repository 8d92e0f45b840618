"""Peak memory of `edgevlm export` on a model with LLaVA-1.5-7B widths, against its weight size.

The model has the real layer shapes (Llama: hidden 4096, MLP 11008, 32 heads, vocab 32064; CLIP
ViT-L/14 at 336 px) but only 2 decoder and 2 vision layers, with random weights, so it fits a
laptop while every tensor is as large as in the 7B model. Its decoder graph (about 2.2 GB) is
over protobuf's 2 GB limit, so the external-data path is exercised too.

Each step runs in its own process and its peak resident memory is read from the kernel
(wait4's ru_maxrss, benchmarks.harness.run_step), so one step's memory does not hide another's:
  build   create the random model folder (not measured against export)
  load    load the model and read every weight, nothing else (the floor for export)
  export  `edgevlm export MODEL --out OUT ...`, the real command

  python -m benchmarks.export.memory [--work DIR] [--precision fp32] [--validate]
Results go to benchmarks/results/export_memory.json (--out), one entry per precision (and
--validate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks import harness

VOCAB = 32064

LLAVA15_7B_2_LAYERS = {
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                      "intermediate_size": 4096, "num_hidden_layers": 2,
                      "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 2, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
}

def build(model_dir: Path) -> None:
    """Random model folder; the tokenizer is padded with unused tokens to LLaVA-1.5's vocab."""
    from edgevlm.models import init_model, save_model
    from edgevlm.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["What color is the circle? There is a red circle."] * 4, 300)
    tok.add_tokens([f"<unused_{i}>" for i in range(VOCAB - len(tok))])
    assert len(tok) == VOCAB
    save_model(init_model(LLAVA15_7B_2_LAYERS, tok, seed=0), model_dir)


def load(model_dir: Path) -> None:
    """Load and read every weight once: safetensors maps the file lazily, and export reads all."""
    import torch

    from edgevlm.models import load_model

    with torch.no_grad():
        sum(float(p.sum()) for p in load_model(model_dir).model.parameters())


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; return (peak RSS in GB, seconds, stdout)."""
    step = harness.run_step(cmd, capture=True, env={"HF_HUB_OFFLINE": "1"})
    return step.peak_rss_bytes / 1e9, step.seconds, step.stdout


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, out=harness.RESULTS / "export_memory.json",
                            work=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--validate", action="store_true", help="Also check parity (slower)")
    parser.add_argument("--step", choices=["build", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "build":
        return build(args.model)
    if args.step == "load":
        return load(args.model)
    record = harness.Record.start(__spec__.name, argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="export_memory."))
    model, out = work / "model", work / f"export_{args.precision}"
    me = [sys.executable, "-m", __spec__.name, "--model", str(model), "--step"]
    if not model.exists():
        run_measured(me + ["build"])
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    load_gb, load_s, _ = run_measured(me + ["load"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "edgevlm"), "export", str(model), "--out", str(out),
           "--precision", args.precision, "--json",
           "--validate" if args.validate else "--no-validate"]
    export_gb, export_s, stdout = run_measured(cmd)
    manifest = json.loads((out / "edgevlm.json").read_text())
    result = {
        "model": "LLaVA-1.5-7B widths, 2 decoder + 2 vision layers, random weights",
        "config": LLAVA15_7B_2_LAYERS,
        "vocab_size": VOCAB,
        "fp32_weights_gb": weights / 1e9,
        "load_only_peak_rss_gb": load_gb,
        "load_only_seconds": load_s,
        "export_command": harness.show(cmd),
        "export_peak_rss_gb": export_gb,
        "export_seconds": export_s,
        "export_peak_over_weights": export_gb / (weights / 1e9),
        "components": manifest["components"],
        "parity": manifest["parity"],
        "summary": json.loads(stdout),
        "versions": manifest["versions"],
    }
    runs = harness.load(args.out)
    runs[args.precision + ("+validate" if args.validate else "")] = result
    harness.write(args.out, runs, record=record)
    print(json.dumps({k: result[k] for k in ("fp32_weights_gb", "load_only_peak_rss_gb",
                                             "export_peak_rss_gb", "export_peak_over_weights",
                                             "export_seconds")}, indent=1))
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
