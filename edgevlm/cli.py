"""`edgevlm` command line: a thin Typer layer over the stage functions.

torch and transformers are imported inside the command bodies, so `edgevlm --help` is instant
and the runtime commands work on a device without torch. Bad input (UserError) becomes one
clear line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edgevlm.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, quantize, export and run vision-language models on devices.")
data_app = typer.Typer(no_args_is_help=True, help="Make data sets.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _summary(title: str, rows: dict, quiet: bool = False, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    if quiet:
        return
    table = Table(title=title, show_header=False)
    for k, v in rows.items():
        table.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Argument(..., help="Folder to create"),
    train: int = typer.Option(3000, help="Training images"),
    eval: int = typer.Option(300, help="Evaluation images (one question each)"),
    seed: int = typer.Option(0),
    image_size: int = typer.Option(48, help="Image side in pixels"),
    blank: bool = typer.Option(False, help="Blank images: the does-it-need-the-image control"),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate the synthetic shapes visual-QA set (pretrain.json, train.json, eval.json)."""
    from edgevlm import shapes
    from edgevlm.atomic import atomic_dir

    if train < 1 or eval < 1:
        raise UserError("--train and --eval must be at least 1")
    with atomic_dir(out, overwrite) as tmp:
        s = shapes.generate(tmp, train, eval, seed, image_size, blank)
    _summary("shapes", {"out": out, "pretrain": s.n_pretrain, "train": s.n_train,
                        "eval": s.n_eval}, quiet, as_json)


@app.command()
def init(
    out: Path = typer.Argument(..., help="Model folder to create"),
    preset: Optional[str] = typer.Option(None, help="tiny-teacher | tiny-student"),
    config: Optional[Path] = typer.Option(None, help="A LlavaConfig JSON"),
    tokenizer_data: Optional[list[Path]] = typer.Option(None, help="Train a BPE on this data"),
    tokenizer_from: Optional[Path] = typer.Option(None, help="Reuse this model's tokenizer"),
    vocab_size: int = typer.Option(512),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a randomly initialised LLaVA model with its tokenizer and processor."""
    _quiet_libraries()
    from edgevlm.models import create

    lm = create(out, preset, config, tokenizer_data, tokenizer_from, vocab_size, seed, overwrite)
    n = sum(p.numel() for p in lm.model.parameters())
    _summary("init", {"out": out, "parameters": f"{n / 1e6:.2f}M",
                      "vocab": lm.model.config.text_config.vocab_size,
                      "image tokens": lm.num_image_tokens}, quiet, as_json)


@app.command()
def train(
    model: Path = typer.Argument(..., help="Model folder to start from"),
    data: Path = typer.Argument(..., help="LLaVA-format JSON"),
    out: Path = typer.Option(..., help="Trained model folder to create"),
    stage: str = typer.Option("sft", help="pretrain (projector) | sft (projector + LLM)"),
    steps: int = typer.Option(1000),
    batch_size: int = typer.Option(16, help="Per process"),
    lr: float = typer.Option(1e-3),
    warmup: int = typer.Option(50),
    save_every: int = typer.Option(200, help="Checkpoint every N steps"),
    seed: int = typer.Option(0),
    train_vision: bool = typer.Option(False, help="Also train the vision tower"),
    image_root: Optional[Path] = typer.Option(None),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint"),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train a model (pretrain or SFT); runs under `accelerate launch` unchanged."""
    _quiet_libraries()
    from edgevlm import train as training
    from edgevlm.data import load_samples
    from edgevlm.models import load_model

    cfg = training.TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr,
                               warmup=warmup, save_every=save_every, seed=seed,
                               train_vision=train_vision)
    samples = load_samples(data, image_root)
    result = training.run(load_model(model), samples, out, cfg, resume=resume,
                          overwrite=overwrite, quiet=quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        _summary("train", {"out": out, "stage": stage, "steps": result.steps,
                           "resumed from": result.resumed_from, "final loss": result.final_loss,
                           "seconds": result.seconds}, quiet, as_json)


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Model folder"),
    data: Path = typer.Argument(..., help="LLaVA-format evaluation JSON"),
    limit: Optional[int] = typer.Option(None, help="First N entries only"),
    batch_size: int = typer.Option(16),
    max_new_tokens: int = typer.Option(16),
    image_root: Optional[Path] = typer.Option(None),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write results to this file"),
    quiet: bool = typer.Option(False),
) -> None:
    """Greedy answers with the torch model; normalized exact match, per question type."""
    _quiet_libraries()
    from edgevlm.data import load_samples
    from edgevlm.evaluate import evaluate
    from edgevlm.models import load_model

    samples = load_samples(data, image_root)[:limit]
    result = evaluate(load_model(model), samples, max_new_tokens, batch_size, quiet)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))
    rows = {"accuracy": result.accuracy, "samples": result.score.total}
    rows.update({f"  {t}": a for t, a in result.score.type_accuracy().items()})
    _summary(f"eval {model}", rows, quiet)


@app.command()
def run(
    target: Path = typer.Argument(..., help="Export folder made by `edgevlm export`"),
    image: Optional[Path] = typer.Option(None, help="Image file (omit for a text-only prompt)"),
    prompt: str = typer.Option(..., help="Question; the image goes before it unless it holds "
                               "<image>"),
    provider: str = typer.Option("auto", help="auto|cpu|cuda|tensorrt|coreml|nnapi|qnn|dml"),
    max_new_tokens: int = typer.Option(64),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: ORT's)"),
    precision: Optional[str] = typer.Option(None, help="fp32|fp16|int8|int4 graphs of the "
                                            "export (default: the manifest's)"),
    temperature: float = typer.Option(0.0, help="0 is greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: Optional[int] = typer.Option(None),
    stop: Optional[list[str]] = typer.Option(None, help="Stop before this text (repeatable)"),
    quiet: bool = typer.Option(False, help="Only the answer, no timings"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON, no stream"),
) -> None:
    """Answer a question about an image with the torch-free ONNX Runtime (streams the answer)."""
    # The runtime only: this command must work on a device without torch or transformers.
    from edgevlm.runtime import VLM

    if not (target / "edgevlm.json").is_file() and (target / "config.json").is_file():
        raise UserError(f"{target} is a model folder, not an export; run `edgevlm export "
                        f"{target} --out DIR` and pass DIR")
    vlm = VLM.load(target, provider=provider, threads=threads, precision=precision)
    stream = vlm.stream(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, stop=stop)
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = stream.result
    t = result.timings
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": list(result.token_ids),
                          "finish_reason": result.finish_reason, "provider": vlm.provider,
                          "precision": vlm.info.precision, "timings": t.__dict__}, indent=1))
        return
    sys.stdout.write("\n")
    if quiet:
        return
    table = Table(title=f"run {target.name} on {vlm.provider} ({vlm.info.precision})",
                  show_header=False)
    for label, value in (("prompt tokens", t.n_prompt_tokens), ("new tokens", t.n_new_tokens),
                         ("finish", result.finish_reason),
                         ("preprocess", f"{t.preprocess_s * 1e3:.1f} ms"),
                         ("vision encoder", f"{t.vision_s * 1e3:.1f} ms"),
                         ("prefill", f"{t.prefill_s * 1e3:.1f} ms"),
                         ("time to first token", f"{t.ttft_s * 1e3:.1f} ms"),
                         ("decode", f"{t.decode_tokens_per_s:.1f} tokens/s"),
                         ("total", f"{t.total_s:.3f} s")):
        table.add_row(label, str(value))
    console.print(table)


@app.command("export")
def export_(
    model: Path = typer.Argument(..., help="Model folder (a LLaVA checkpoint)"),
    out: Path = typer.Option(..., help="Export folder to create"),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8 | int4: the decoder, and the "
                                  "other components unless set below"),
    vision_precision: Optional[str] = typer.Option(None, help="Vision encoder precision"),
    embed_precision: Optional[str] = typer.Option(None, help="Token embedding precision"),
    block_size: int = typer.Option(32, help="int4: input channels per scale and zero point"),
    validate: bool = typer.Option(True, "--validate/--no-validate",
                                  help="Check parity with the torch model before writing"),
    external_data: bool = typer.Option(False, help="Always keep weights in <graph>.onnx_data "
                                       "(default: only above 1 GB)"),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Export a model to ONNX graphs (vision encoder, token embedding, decoder with KV cache)."""
    _quiet_libraries()
    from edgevlm.export import ExportConfig, export

    cfg = ExportConfig(precision=precision, vision_precision=vision_precision,
                       embed_precision=embed_precision, block_size=block_size, validate=validate,
                       overwrite=overwrite, external_data=True if external_data else None)
    result = export(model, out, cfg, quiet=quiet or as_json)
    rows: dict = {"out": out}
    for name, f in result.components.items():
        rows[name] = f"{f.file} ({f.precision}, {f.bytes / 1e6:.2f} MB)"
    if result.parity is not None:
        greedy = result.parity.greedy
        rows["parity"] = "passed"
        rows.update({f"  {name} max-abs": e.max_abs
                     for name, e in result.parity.components.items()})
        rows["  greedy tokens equal"] = f"{greedy.matching_prefix}/{greedy.new_tokens}"
    rows["seconds"] = result.seconds
    _summary("export", rows, quiet, as_json)


def main() -> None:
    try:
        app()
    except UserError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
