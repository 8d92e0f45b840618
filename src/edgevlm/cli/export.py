"""`edgevlm export`: ONNX graphs from a model folder, their parity, and the mobile readiness table.

Kept apart from edgevlm.cli (its longest command and the helpers only it uses); edgevlm.cli
registers it on the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edgevlm.cli.common import console, quiet_libraries, show_next, summary
from edgevlm.cli.next_steps import after_export


def export_(
    model: Path = typer.Argument(..., help="Model folder (a LLaVA checkpoint)"),
    out: Path = typer.Option(..., help="Export folder to create"),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 | int8 | int4: the decoder, "
                                            "and the other components unless set below "
                                            "(default: the profile's)"),
    vision_precision: Optional[str] = typer.Option(
        None, help="Vision encoder precision (default: --precision's; int8 under --precision "
        "int4, the faster kernel on CPU, unless the checkpoint quantized its vision layers)"),
    embed_precision: Optional[str] = typer.Option(None, help="Token embedding precision"),
    block_size: Optional[int] = typer.Option(None, help="int4: input channels per scale and "
                                             "zero point (default: the checkpoint's group "
                                             "size, else 32)"),
    validate: bool = typer.Option(True, "--validate/--no-validate",
                                  help="Check parity with the torch model before writing"),
    external_data: bool = typer.Option(False, help="Always keep weights in <graph>.onnx_data "
                                       "(default: only above 1 GB)"),
    profile: str = typer.Option("default", help="default (fp32, dynamic shapes) | mobile (static "
                                "shapes, NNAPI/CoreML ops, fp16, ORT format) | gpu (fp16 vision "
                                "and embedding, int4 MatMulNBits decoder)"),
    max_context: Optional[int] = typer.Option(None, help="Positions the KV cache holds, prompt "
                                              "with image tokens plus answer: the mobile "
                                              "profile's fixed cache (default: min(model limit, "
                                              "1024)) or the builder decoder's KV buffer "
                                              "(default: min(model limit, 2048))"),
    decoder: Optional[str] = typer.Option(None, help="builder (the graph written from the "
                                          "weights with onnxruntime's fused ops; Llama and Qwen2 "
                                          "text models, others fall back to traced) | traced "
                                          "(torch.onnx; the parity reference) (default: builder, "
                                          "traced with --profile mobile)"),
    accuracy_level: Optional[int] = typer.Option(None, help="Builder int4/int8: MatMulNBits "
                                                 "accuracy_level, 0 float activations, 4 int8 "
                                                 "(default: 4, 0 with --profile gpu)"),
    visual_tokens: Optional[int] = typer.Option(None, help="Image tokens the decoder sees, "
                                                "chosen by --token-select from the tower's "
                                                "(LLaVA; the runtime selects after the vision "
                                                "graph)"),
    token_select: Optional[str] = typer.Option(None, help="divprune (feature diversity, no "
                                               "attention) | visionzip (attention-dominant + "
                                               "merged contextual tokens)"),
    image_splitting: Optional[bool] = typer.Option(
        None, "--image-splitting/--no-image-splitting", help="Idefics3 / SmolVLM: cut images "
        "into tiles plus the global image, or take the global image only (default: the model's "
        "processor; --profile mobile needs --no-image-splitting)"),
    min_pixels: Optional[int] = typer.Option(None, help="Qwen2-VL: the fewest pixels an image "
                                             "is resized to (default: the model's processor)"),
    max_pixels: Optional[int] = typer.Option(None, help="Qwen2-VL: the most pixels an image is "
                                             "resized to; larger images shrink (default: the "
                                             "model's processor)"),
    overwrite: bool = typer.Option(False),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Export a model to ONNX graphs (vision encoder, token embedding, decoder with KV cache)."""
    quiet_libraries()
    from edgevlm.export import ExportConfig, export

    cfg = ExportConfig(precision=precision, vision_precision=vision_precision,
                       embed_precision=embed_precision, block_size=block_size, validate=validate,
                       overwrite=overwrite, external_data=True if external_data else None,
                       profile=profile, max_context=max_context, decoder=decoder,
                       accuracy_level=accuracy_level, visual_tokens=visual_tokens,
                       token_select=token_select, image_splitting=image_splitting,
                       min_pixels=min_pixels, max_pixels=max_pixels)
    result = export(model, out, cfg, quiet=quiet or as_json)
    rows: dict = {"out": out, "profile": profile, "decoder": _decoder_row(result.decoder)}
    rows.update(_genai_row(result.decoder))
    for name, f in result.components.items():
        rows[name] = f"{f.file} ({f.precision}, {f.bytes / 1e6:.2f} MB)"
    if result.vision_int8 is not None:  # what int8 costs the tower, and what shipped
        rows["  vision int8"] = (f"{result.vision_int8['relative_error']:.1%} from float: "
                                 f"{result.vision_int8['why']}")
    if result.parity is not None:
        rows.update(_parity_rows(result.parity))
    rows["seconds"] = result.seconds
    summary("export", rows, quiet, as_json)
    if result.readiness is not None and not as_json:
        _readiness_table(result.readiness, quiet)
    show_next(after_export(out), quiet, as_json)


def _parity_rows(parity) -> dict:
    """The summary rows of the parity check: per component, greedy tokens, and the gates on the
    integers a built decoder or an int8 tower carries."""
    rows: dict = {}
    greedy = parity.greedy
    rows["parity"] = "passed"
    rows.update({f"  {name} max-abs": e.max_abs
                 for name, e in parity.components.items()})
    rows["  greedy tokens equal"] = f"{greedy.matching_prefix}/{greedy.new_tokens}"
    check = parity.graph_check
    if check is not None:  # a built int4/int8 decoder: gated on the same integers
        rows["  decoder vs torch, same integers"] = (
            f"max-abs {check.max_abs:.2g}, tokens {check.matching_steps}/{check.steps}")
        rows[f"  as shipped (accuracy_level {check.shipped_accuracy_level})"] = (
            f"max-abs {check.shipped_max_abs:.2g}, tokens "
            f"{check.shipped_matching_steps}/{check.steps}")
    vision = parity.vision_check
    if vision is not None:  # an int8 tower: gated on the same integers
        rows["  vision vs torch, same integers"] = (
            f"max-abs {vision.max_abs:.2g}, {vision.matmuls} MatMulInteger, "
            f"{vision.kernel_mismatches} integer outputs off")
        rows["  as shipped (int8 activations)"] = f"max-abs {vision.shipped_max_abs:.2g}"
    return rows


def _genai_row(decoder: dict | None) -> dict:
    """onnxruntime-genai's pipeline for the export, and why it takes no images where it does
    not (edgevlm.json decoder.genai); no row for an export without a genai config."""
    genai = (decoder or {}).get("genai")
    if not genai:
        return {}
    return {"onnxruntime-genai": f"{genai['type']}, images" if genai["images"]
            else f"{genai['type']}, text only: {genai['reason']}"}


def _decoder_row(decoder: dict | None) -> str:
    """How the decoder was made, and why not built when it fell back."""
    if not decoder:
        return "traced"
    if decoder["kind"] == "builder":
        level = decoder.get("accuracy_level")
        return (f"builder ({decoder['nodes']} nodes, KV buffer {decoder['max_context']}"
                + (f", accuracy_level {level}" if level is not None else "") + ")")
    reason = decoder.get("fallback_reason")
    return f"traced ({reason})" if reason else "traced"


def _readiness_table(readiness, quiet: bool) -> None:
    """Share of nodes and partitions per provider, the figures stored in edgevlm.json."""
    from edgevlm.export.readiness import EP_TITLES

    if not quiet:
        table = Table(title="mobile readiness (onnxruntime check_onnx_model_mobile_usability)")
        table.add_column("component")
        for title in EP_TITLES.values():
            table.add_column(title, justify="right")
        for component, eps in readiness.components.items():
            table.add_row(component, *(f"{r.share:.0%} in {r.partitions}" for r in eps.values()))
        console.print(table)
    for miss in readiness.misses:
        console.print(f"[yellow]target missed:[/yellow] {miss}", highlight=False)
