"""The device-side commands, `edgevlm run`, `bench` and `plan`: torch-free for exports.

Kept apart from edgevlm.cli so the commands a device runs read in one place; edgevlm.cli
registers them on the app.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgevlm.atomic import atomic_dir, check_new, unlock
from edgevlm.cli.common import show_next
from edgevlm.cli.next_steps import after_bench
from edgevlm.errors import UserError

console = Console(stderr=True)


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


def bench_(
    targets: Optional[list[Path]] = typer.Argument(
        None, help="Export folders (runtime) or model folders (torch reference); with "
        "--compare, bench.json files"),
    data: Optional[Path] = typer.Option(None, help="LLaVA-format evaluation JSON"),
    report: Optional[Path] = typer.Option(None, help="Write bench.json, bench.md and bench.png "
                                          "into this folder"),
    limit: Optional[int] = typer.Option(None, help="Accuracy over the first N samples"),
    repeats: int = typer.Option(3, help="Timed answers per timing sample"),
    warmup: int = typer.Option(1, help="Untimed answers first"),
    max_new_tokens: int = typer.Option(16),
    timing_samples: int = typer.Option(4, help="The first N samples are timed"),
    provider: str = typer.Option("auto", help="auto|cpu|cuda|tensorrt|coreml|nnapi|qnn|dml"),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: the "
                                          "library's)"),
    precision: Optional[str] = typer.Option(None, help="fp32|fp16|int8|int4 graphs of an "
                                            "export (default: the manifest's)"),
    image_root: Optional[Path] = typer.Option(None, help="Folder the data file's image paths are "
                                              "relative to (default: the JSON file's folder)"),
    compare: bool = typer.Option(False, "--compare", help="Merge the bench.json files given as "
                                 "TARGETs (one per device) into one table and plot"),
    overwrite: bool = typer.Option(False, help="Replace an existing --report folder (one "
                                   "edgevlm wrote)"),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Accuracy, time to first token, prefill, decode rate, memory and size of each target."""
    # The runtime's bench: torch is imported (in a worker process) only for model folders.
    from edgevlm.bench.harness import BenchConfig, bench
    from edgevlm.bench.report import load_report, merge

    targets = targets or []
    inputs = [*targets, data, image_root]
    if compare and not targets:
        raise UserError("--compare needs the bench.json files to merge, e.g. `edgevlm bench "
                        "--compare phone/bench.json laptop/bench.json --report DIR`")
    if not compare and data is None:
        raise UserError("--data EVAL.json is required: the LLaVA-format samples to answer")
    try:
        if report is not None:  # refused now, not after minutes of measuring
            _check_out(report, overwrite, inputs, "--report")
        if compare:
            result = merge([load_report(t) for t in targets], [str(t) for t in targets])
        else:
            cfg = BenchConfig(limit=limit, warmup=warmup, repeats=repeats,
                              max_new_tokens=max_new_tokens, provider=provider,
                              threads=threads, timing_samples=timing_samples,
                              precision=precision)
            result = _bench_with_progress(bench, targets, data, cfg, image_root,
                                          quiet or as_json)
        written = _save_bench(result, report, overwrite, inputs, as_json) if report else []
    finally:
        if report is not None:
            unlock(report)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    elif not quiet:
        bench_table(result, written)
    show_next(after_bench(report), quiet, as_json)


def _check_out(out: Path, overwrite: bool, inputs: list, flag: str) -> None:
    """OUT can be written, before any work: the first folder that exists on its way is a
    writable folder (not a file, not on a read-only file system), and OUT is new, or
    `overwrite` and replacing it is safe (edgevlm.atomic.check_new, which takes OUT's lock)."""
    above = out.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} {out} cannot be made: {above} is a file; choose another "
                        f"{flag}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out} cannot be written: {above} is read-only (a read-only "
                        f"file system or no permission); choose another {flag}")
    check_new(out, overwrite, [i for i in inputs if i is not None])


def _write_out(out: Path, overwrite: bool, inputs: list, write) -> list[Path]:
    """`write(folder) -> files` into a folder beside OUT that replaces it when complete
    (edgevlm.atomic.atomic_dir); the files as they lie in OUT."""
    with atomic_dir(out, overwrite, [i for i in inputs if i is not None]) as tmp:
        names = [p.name for p in write(tmp)]
    return [out / n for n in names]


def _why(e: OSError) -> str:
    """"No space left on device: PATH" from an OSError, whatever raised it."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return f"{reason}: {e.filename}" if e.filename else reason


def _fallback_path() -> Path:
    """Where bench keeps the measurements when its report folder cannot be written: the
    temporary folder, which is most often on another file system than the user's runs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"edgevlm-bench-{stamp}-{os.getpid()}.json"


def _save_bench(result, report: Path, overwrite: bool, inputs: list, as_json: bool):
    """Write the report folder; when that fails (disk full, read-only, a file in the way) keep
    what was measured, in a file of the temporary folder, or on stdout if even that fails,
    and end in one line that says where and how to write the report from it."""
    from edgevlm.bench.report import to_json, write_report

    try:
        return _write_out(report, overwrite, inputs, lambda tmp: write_report(result, tmp))
    except OSError as e:
        failure = e
    text = to_json(result)
    kept = _fallback_path()
    try:
        kept.write_text(text, encoding="utf-8")
        where = f"are saved in {kept}"
    except OSError:
        if not as_json:  # --json prints them below anyway
            print(text, end="")
        where, kept = "are printed on stdout (save them as BENCH.json)", Path("BENCH.json")
    if as_json:
        print(text, end="")
    raise UserError(f"could not write the bench report to {report} ({_why(failure)}); the "
                    f"measurements {where}: free space or choose a writable folder, then "
                    f"`edgevlm bench --compare {kept} --report DIR` writes the report from them")


def _bench_with_progress(bench, targets, data, cfg, image_root, quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # The torch reference for model folders enters the runtime's bench here, from the toolkit;
    # importing it now names a missing toolkit in one line (main), not in a worker's traceback.
    from edgevlm.bench.harness import target_kind

    model_target = "edgevlm.bench.torch_target:TorchTarget"
    if any(target_kind(t) == "model" for t in targets):
        import edgevlm.bench.torch_target  # noqa: F401
    if quiet:
        return bench(targets, data, cfg, image_root, model_target=model_target)
    tasks: dict[str, int] = {}
    with Progress(TextColumn("[bold]bench {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=console) as bar:
        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        return bench(targets, data, cfg, image_root, on_progress=update,
                     model_target=model_target)


def bench_table(result, written: list[Path]) -> None:
    """The figures a user compares, on stdout, within the terminal's width (80 columns when
    piped or logged); bench.md keeps every column."""
    width = Console().width if sys.stdout.isatty() else 80
    Console(width=width).print(bench_view(result, width))
    for path in written:
        console.print(Text(f"wrote {path}"))
    if written:
        console.print("bench.md has every column: vision, prefill, p10-p90, machines")


def bench_view(result, width: int = 80):
    """One row per target when that fits in `width`, else one block per target (long names,
    several devices): never a cut cell, as rich gives a table wider than its console."""
    from rich.console import Group
    from rich.measure import Measurement

    devices = len(result.machines) > 1
    title = f"bench on {result.data} ({result.n_samples} samples)"
    # Text, never markup: names, paths and devices come from folders and bench.json files.
    table = Table(title=Text(title, style="italic"),
                  caption=Text(result.note) if result.note else None,
                  caption_style="bold yellow")
    for col in (["device"] if devices else []) + ["target", *_HEADERS]:
        table.add_column(col, justify="left" if col in ("device", "target") else "right",
                         no_wrap=True)
    for t in result.targets:
        target = Text(t.name) + Text(f"\n{_runs_on(t)}", style="dim")
        table.add_row(*([Text(t.device)] if devices else []), target, *map(Text, _cells(t)))
    # Measured unbounded: a measurement within the console's width is clamped to it.
    measuring = Console(width=10_000)
    if Measurement.get(measuring, measuring.options, table).maximum <= width:
        return table
    blocks = [Text(title, style="italic")]
    if result.note:
        blocks.append(Text(result.note, style="bold yellow"))
    for t in result.targets:
        acc, ttft, rate, peak, disk = _cells(t)
        blocks.append(Text(t.name, style="bold"))
        blocks += [Text(line) for line in _pack(
            [_runs_on(t) + (f" @ {t.device}" if devices else ""), f"accuracy {acc}",
             f"TTFT {ttft} ms", f"decode {rate} tok/s", f"peak {peak} MB", f"disk {disk} MB"],
            width)]
    return Group(*blocks)


_HEADERS = ("accuracy", "TTFT\nms", "decode\ntok/s", "peak\nMB", "disk\nMB")


def _cells(t) -> tuple[str, str, str, str, str]:
    """A target's accuracy, median TTFT, median decode rate, peak memory and size, printed."""
    from edgevlm.data.metrics import percent

    def median(s, scale: float = 1.0) -> str:
        return f"{s.median * scale:.1f}" if s.n else "–"

    return (percent(t.accuracy), median(t.ttft_s, 1e3), median(t.decode_tokens_per_s),
            f"{t.peak_rss_bytes / 1e6:.0f}" if t.peak_rss_bytes else "–",
            f"{t.disk_bytes / 1e6:.2f}")


def _runs_on(t) -> str:
    return f"{t.precision} on {'torch' if t.backend == 'transformers' else 'ort'}:{t.provider}"


def _pack(items: list[str], width: int, indent: str = "  ", gap: str = "   ") -> list[str]:
    """The items on as few lines of at most `width` characters as hold them, none split."""
    lines = [indent]
    for item in items:
        if lines[-1] != indent and len(lines[-1]) + len(gap) + len(item) > width:
            lines.append(indent)
        lines[-1] += ("" if lines[-1] == indent else gap) + item
    return lines


def plan_(
    reports: list[Path] = typer.Option(..., "--reports", help="bench.json files of the "
                                       "candidate exports (one eval set)"),
    max_ttft_ms: Optional[float] = typer.Option(None, help="Time to first token with an "
                                                "image, median, at most this"),
    max_memory_mb: Optional[float] = typer.Option(None, help="Peak resident memory at most "
                                                  "this"),
    out: Optional[Path] = typer.Option(None, help="Write plan.json (and plan.png) here"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder (one edgevlm "
                                   "wrote)"),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
) -> None:
    """The most accurate measured export inside a TTFT / memory budget, and the Pareto front."""
    from edgevlm.bench import plan as planner

    try:
        if out is not None:
            _check_out(out, overwrite, reports, "--out")
        result = planner.plan(reports, max_ttft_ms, max_memory_mb)
        if as_json:
            print(json.dumps(result.to_dict(), indent=1))
        else:
            plan_table(result, max_ttft_ms, max_memory_mb)
        written = _save_plan(result, out, overwrite, reports) if out is not None else []
    finally:
        if out is not None:
            unlock(out)
    if not as_json:
        for path in written:
            console.print(Text(f"wrote {path}"))


def plan_table(result, max_ttft_ms: float | None, max_memory_mb: float | None) -> None:
    """The Pareto front on stdout and the chosen point on stderr; names and paths printed as
    they are, never read as rich markup."""
    from rich.markup import escape

    from edgevlm.data.metrics import percent

    table = Table(title="Pareto front (accuracy up, TTFT and memory down)")
    for col in ("target", "accuracy", "TTFT ms", "peak MB", "disk MB", "bits", "visual tokens",
                "family", "in budget"):
        table.add_column(col, justify="left" if col in ("target", "family") else "right")
    for c in result.front:
        inside = c.over(max_ttft_ms, max_memory_mb) == 0
        table.add_row(("* " if c == result.chosen else "") + escape(c.name),
                      percent(c.accuracy), f"{c.ttft_ms:.1f}",
                      f"{c.memory_mb:.0f}" if c.memory_mb else "–", f"{c.disk_mb:.1f}",
                      str(c.weight_bits or "–"), str(c.visual_tokens or "–"),
                      escape(c.family) or "–", "yes" if inside else "no")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    c = result.chosen
    console.print(Text(f"chosen: {c.name} ({c.source}): accuracy {percent(c.accuracy)}, TTFT "
                       f"{c.ttft_ms:.1f} ms, peak {c.memory_mb or 0:.0f} MB"))


def _save_plan(result, out: Path, overwrite: bool, reports: list[Path]) -> list[Path]:
    """plan.json (and plan.png) into OUT, atomically; a failed write is one line (the plan is
    printed above, and is made again from the same reports in seconds)."""
    from edgevlm.bench import plan as planner

    try:
        return _write_out(out, overwrite, reports, lambda tmp: planner.write(result, tmp))
    except OSError as e:
        raise UserError(f"could not write the plan to {out} ({_why(e)}); nothing was written "
                        "there and the plan is printed above: free space or choose a writable "
                        "--out, and run `edgevlm plan` again") from None
