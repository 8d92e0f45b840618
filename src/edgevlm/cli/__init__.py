"""`edgevlm` command line: a thin Typer layer over the stage functions.

torch and transformers are imported inside the command bodies, so `edgevlm --help` is instant
and the runtime commands work on a device without torch. Bad input (UserError) becomes one
clear line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from edgevlm.cli.common import (
    IMAGE_ROOT_HELP,
    BatchSizeOpt,
    JsonOpt,
    LongSamplesOpt,
    LrOpt,
    MaxLengthOpt,
    QuietOpt,
    SaveEveryOpt,
    SaveMinutesOpt,
    SeedOpt,
    WarmupOpt,
    console,
    fit_rows,
    quiet_libraries,
    show_next,
    summary,
)
from edgevlm.cli.device import bench_, bench_table, plan_, run
from edgevlm.cli.distill import distill_, moe_upcycle_
from edgevlm.cli.export import export_
from edgevlm.cli.next_steps import after_demo, after_init, after_shapes, after_train
from edgevlm.cli.quant import quantize_
from edgevlm.cli.serve import serve_
from edgevlm.errors import UserError, check_at_least

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, quantize, export and run vision-language models on devices.")
data_app = typer.Typer(no_args_is_help=True, help="Make data sets.")
app.add_typer(data_app, name="data")


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
    from edgevlm.atomic import atomic_dir
    from edgevlm.data import shapes

    if train < 1 or eval < 1:
        raise UserError("--train and --eval must be at least 1")
    with atomic_dir(out, overwrite) as tmp:
        s = shapes.generate(tmp, train, eval, seed, image_size, blank)
    summary("shapes", {"out": out, "pretrain": s.n_pretrain, "train": s.n_train,
                        "eval": s.n_eval}, quiet, as_json)
    show_next(after_shapes(out), quiet, as_json)


@data_app.command("pydoc")
def data_pydoc(
    out: Path = typer.Argument(..., help="Text file to write"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Write the English help text that ships with Python (pydoc_data.topics): the real text
    `edgevlm eval --text` scores."""
    from edgevlm.atomic import check_new
    from edgevlm.perplexity import pydoc_text

    check_new(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = pydoc_text()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(out)
    summary("pydoc", {"out": out, "characters": len(text)})


@app.command()
def init(
    out: Path = typer.Argument(..., help="Model folder to create"),
    preset: Optional[str] = typer.Option(None, help="tiny-teacher | tiny-student | "
                                         "llava-smollm2 (SigLIP 224 px, for --text-from) | "
                                         "tiny-smolvlm | smolvlm-smollm2 (Idefics3, for "
                                         "--text-from)"),
    config: Optional[Path] = typer.Option(None, help="A LlavaConfig, Idefics3Config or "
                                          "SmolVLMConfig JSON; its model_type (llava when "
                                          "absent, idefics3, smolvlm) picks the family"),
    tokenizer_data: Optional[list[Path]] = typer.Option(None, help="Train a BPE on this data"),
    tokenizer_from: Optional[Path] = typer.Option(None, help="Reuse this model's tokenizer"),
    vision_from: Optional[Path] = typer.Option(
        None, help="Start the vision tower from this model's (e.g. the teacher's)"),
    text_from: Optional[Path] = typer.Option(
        None, help="A pretrained causal LM (Hugging Face folder or .gguf) as the language model, "
        "with its own tokenizer and chat template"),
    vocab_size: int = typer.Option(512),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a LLaVA model with its tokenizer and processor: random, or around a pretrained LM."""
    quiet_libraries()
    from edgevlm.models import create

    lm = create(out, preset, config, tokenizer_data, tokenizer_from, vocab_size, seed, overwrite,
                vision_from, text_from)
    n = sum(p.numel() for p in lm.model.parameters())
    summary("init", {"out": out, "parameters": f"{n / 1e6:.2f}M",
                      "vocab": lm.model.config.text_config.vocab_size,
                      "image tokens": lm.num_image_tokens}, quiet, as_json)
    show_next(after_init(out, tokenizer_data), quiet, as_json)


@app.command()
def train(
    model: Path = typer.Argument(..., help="Model folder to start from"),
    data: list[Path] = typer.Argument(..., help="LLaVA-format JSON; several files are mixed"),
    out: Path = typer.Option(..., help="Trained model folder to create"),
    stage: str = typer.Option("sft", help="pretrain (projector) | sft (projector + LLM)"),
    steps: int = typer.Option(1000),
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = 1e-3,
    warmup: WarmupOpt = 50,
    save_every: SaveEveryOpt = 200,
    save_every_minutes: SaveMinutesOpt = None,
    seed: SeedOpt = 0,
    train_vision: bool = typer.Option(False, help="Also train the vision tower"),
    visual_tokens: Optional[int] = typer.Option(None, help="Train at this many image tokens, "
                                                "kept by --token-select (the fine-tuned point "
                                                "of the token curve; export then uses it)"),
    token_select: str = typer.Option("divprune", help="divprune (the only one that trains)"),
    max_length: MaxLengthOpt = None,
    long_samples: LongSamplesOpt = "truncate",
    image_root: Optional[Path] = typer.Option(None, help=IMAGE_ROOT_HELP),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint, with the "
                                "settings the run started with (a difference is refused)"),
    overwrite: bool = typer.Option(False),
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a model (pretrain or SFT); runs under `accelerate launch` unchanged."""
    quiet_libraries()
    from edgevlm import train as training
    from edgevlm.data import load_samples
    from edgevlm.models import load_model
    from edgevlm.progress import note

    cfg = training.TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr,
                               warmup=warmup, save_every=save_every,
                               save_every_minutes=save_every_minutes, seed=seed,
                               train_vision=train_vision, max_length=max_length,
                               long_samples=long_samples, visual_tokens=visual_tokens,
                               token_select=token_select)
    samples = [s for path in data for s in load_samples(path, image_root)]
    note(f"loading model {model} ...", enabled=not quiet and int(os.environ.get("RANK", "0")) == 0)
    result = training.run(load_model(model), samples, out, cfg, resume=resume,
                          overwrite=overwrite, quiet=quiet, inputs=[model, *data])
    if int(os.environ.get("RANK", "0")) == 0:
        summary("train", {"out": out, "stage": stage, "samples": len(samples),
                           **fit_rows(result.data), "steps": result.steps,
                           "resumed from": result.resumed_from, "final loss": result.final_loss,
                           "seconds": result.seconds}, quiet, as_json)
        show_next(after_train(out, data), quiet, as_json)


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Model folder"),
    data: Optional[Path] = typer.Argument(None, help="LLaVA-format evaluation JSON"),
    text: Optional[Path] = typer.Option(None, help="Also (or only) the language model's "
                                        "perplexity on this UTF-8 text (`edgevlm data pydoc`)"),
    max_tokens: Optional[int] = typer.Option(8192, help="--text: score the first N tokens"),
    context: int = typer.Option(512, help="--text: tokens per scored window"),
    limit: Optional[int] = typer.Option(None, help="First N entries only"),
    batch_size: int = typer.Option(16),
    max_new_tokens: int = typer.Option(16),
    image_root: Optional[Path] = typer.Option(None, help=IMAGE_ROOT_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write results to this file"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (auto: CUDA when torch sees it)"),
    quiet: bool = typer.Option(False),
) -> None:
    """Greedy answers with the torch model, normalized exact match per question type; with
    --text, the language model's perplexity on real text (float or quantized checkpoints)."""
    quiet_libraries()
    from edgevlm.data import load_samples
    from edgevlm.data.metrics import percent
    from edgevlm.devices import resolve_device
    from edgevlm.evaluate import evaluate
    from edgevlm.perplexity import perplexity, read_text
    from edgevlm.progress import note
    from edgevlm.quant.act import load_for_eval

    if data is None and text is None:
        raise UserError("give an evaluation DATA.json, --text FILE, or both")
    check_at_least(1, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens)
    samples = load_samples(data, image_root)[:limit] if data is not None else None
    body = read_text(text) if text is not None else None  # bad input fails before the load
    note(f"loading model {model} ...", enabled=not quiet)
    loaded = load_for_eval(model, resolve_device(device))
    out, rows = {}, {}
    if samples is not None:
        result = evaluate(loaded, samples, max_new_tokens, batch_size, quiet)
        out = result.to_dict()
        rows = {"accuracy": percent(result.accuracy), "samples": result.score.total}
        rows.update({f"  {t}": percent(a) for t, a in result.score.type_accuracy().items()})
    if body is not None:
        ppl = perplexity(loaded, body, context, max_tokens, where=str(text), quiet=quiet)
        out["perplexity"] = {**ppl.to_dict(), "text": str(text)}
        rows.update({"perplexity": ppl.perplexity, "  tokens scored": ppl.tokens_scored,
                     "  context": context})
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))
    summary(f"eval {model}", rows, quiet)


app.command("quantize")(quantize_)
app.command("export")(export_)
app.command("distill")(distill_)
app.command("moe-upcycle")(moe_upcycle_)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for every artifact of the run"),
    quick: bool = typer.Option(False, help="Small settings: a smoke test of the pipeline"),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The whole pipeline on generated data: teacher, distilled student, Q-VLM W4, export, bench.

    Rerunning resumes from the last finished stage.
    """
    quiet_libraries()
    from edgevlm.bench.report import load_report
    from edgevlm.cli.demo import SMOKE_NOTE, DemoConfig, run_demo

    def log(msg: str) -> None:
        if not (quiet or as_json):
            console.print(msg)

    result = run_demo(out, DemoConfig.make(quick), quiet=quiet or as_json, log=log)
    if as_json:
        print(json.dumps({"stages": result.stages, "bench": result.bench,
                          "plan": result.plan}, indent=1))
        return
    if not quiet:
        bench_table(load_report(out / "report" / "bench.json"), [out / "report"])
        budget = result.plan["budget"]
        console.print(f"plan (TTFT <= {budget['max_ttft_ms']} ms, half the teacher's; peak <= "
                      f"{budget['max_memory_mb']:.0f} MB): "
                      + (f"{result.chosen}" if result.chosen else result.plan.get("error", "")))
        if quick:  # the table's caption says it too; this line says what to do instead
            console.print(f"[yellow]{SMOKE_NOTE}; run `edgevlm demo` without --quick for "
                          "numbers that mean something[/yellow]")
    show_next(after_demo(out / "export", *result.first_question()), quiet, as_json)


app.command()(run)
app.command("bench")(bench_)
app.command("plan")(plan_)
app.command("serve")(serve_)


def _close_process_group() -> None:
    """Leave a torchrun / accelerate process group before the interpreter exits: gloo's threads
    torn down at exit instead sometimes abort a rank ("terminate called without an active
    exception", SIGABRT) after its work is done and saved."""
    dist = sys.modules.get("torch.distributed")  # never imports torch for other commands
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# What `pip install edgevlm[toolkit]` adds (pyproject.toml); the runtime install lacks them.
TOOLKIT_MODULES = ("torch", "transformers", "accelerate", "safetensors", "onnx", "onnxscript",
                   "compressed_tensors", "gguf", "matplotlib")


# What writing an output can meet that is the machine's, not a bug: no space, a read-only file
# system, a quota, no permission, a file where a folder should be (and the reverse)
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM,
                errno.EEXIST, errno.ENOTDIR, errno.EISDIR}
WRITE_FIXES = {errno.ENOSPC: "free space or choose another --out",
               errno.EDQUOT: "free space or choose another --out",
               errno.EEXIST: "a file stands where a folder is needed: choose another --out",
               errno.ENOTDIR: "a file stands where a folder is needed: choose another --out",
               errno.EISDIR: "a folder stands where a file is needed: choose another --out"}


def main() -> None:
    try:
        app()
    except UserError as e:
        from rich.markup import escape

        # escaped: a message may name `pip install 'edgevlm[toolkit]'`, which is markup to rich
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        from rich.markup import escape

        where = f" {e.filename}" if e.filename else ""
        fix = WRITE_FIXES.get(e.errno, "choose an --out you can write")
        console.print("[red]error:[/red] " + escape(
            f"cannot write{where}: {e.strerror or e}; {fix} (an existing output was left as "
            "it was)"), highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in TOOLKIT_MODULES:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "this command")
        from rich.markup import escape

        console.print("[red]error:[/red] " + escape(
            f"`edgevlm {command}` needs the toolkit, and {e.name} is not installed: install the "
            "torch build for your machine, then pip install -e '.[toolkit]' from a clone "
            "(README, Set up); `edgevlm run` and `bench` on exports need only the runtime install"),
            highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        _close_process_group()

