"""`export(model_dir, out_dir, ExportConfig(...))`: a LLaVA checkpoint to ONNX graphs.

Writes the layout of runtime/contract.py (the transformers.js / SmolVLM ONNX release layout):
onnx/{vision_encoder,embed_tokens,decoder_model_merged}{suffix}.onnx, the model's config,
tokenizer and processor files, and edgevlm.json. The folder is built beside OUT and renamed
into place only when every graph has passed the checker and, unless disabled, parity with torch.

Memory: the torch model is loaded once and each graph's weights are streamed from it tensor by
tensor (edgevlm.export.weights). Graphs derived from fp32 (fp32, int8, int4) are traced first;
then, only if some component is fp16, the model is turned to half precision in place and those
are traced. The torch model is freed before the quantizers and onnxruntime load the graphs.
Measured in benchmarks/export/memory.py.

A quantized checkpoint (`edgevlm quantize`, compressed-tensors pack-quantized) is loaded
dequantized for tracing and validation, and its layers' integers, scales and zero points reach
the graph unchanged: 4 bits in groups into MatMulNBits (int4, block size = its group size), 8 bits
per channel, symmetric, into MatMulInteger (int8, edgevlm.export.int8). The layers it kept in
float (lm_head, projector, ...) take the ordinary path of their component's precision. A
component holding checkpoint layers is exported at the checkpoint's precision or in float, never
re-rounded to the other integer precision.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edgevlm.errors import UserError
from edgevlm.export import decoder as dec
from edgevlm.export import images, onnx_io, readiness
from edgevlm.export import precision as prec
from edgevlm.export import source as ckpt
from edgevlm.export.config import INT4_VISION, ExportConfig
from edgevlm.export.validate import Parity
from edgevlm.families import family_of
from edgevlm.families.backbones import input_side
from edgevlm.runtime import contract, token_select
from edgevlm.runtime.contract import DecoderKind, Precision, Profile

log = logging.getLogger(__name__)


class ParityError(UserError):
    """The exported graphs do not match torch within the stated tolerances."""

    def __init__(self, message: str, parity: Parity):
        super().__init__(message)
        self.parity = parity


@dataclass(frozen=True)
class ComponentFile:
    file: str  # relative to the export folder
    precision: str
    bytes: int  # graph plus external data
    external_data: str | None  # relative path of the weights file, if separate
    float_weights: tuple[str, ...] = ()  # int8/int4: weight matrices left unquantized


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    components: dict[str, ComponentFile]
    parity: Parity | None
    seconds: float
    readiness: readiness.Readiness | None = None  # mobile: NNAPI/CoreML coverage per graph
    decoder: dict | None = None  # edgevlm.json "decoder": kind, fallback reason, KV buffer, ...
    vision_int8: dict | None = None  # edgevlm.json "vision_int8": what int8 cost the tower, and
    # whether it shipped in int8 or stayed fp32


def _trace(model, component: str, precision: Precision, out: Path, cfg: ExportConfig,
           num_layers: int, shapes=None, side: int | None = None) -> tuple[Path, bool]:
    """Trace one component and write its weights; int8/int4 ones go to a scratch float graph
    that `_finish` quantizes. Returns the graph's path and whether its weights are external.
    `shapes` (edgevlm.export.mobile.StaticShapes) traces the mobile graphs with every axis
    fixed; `side`, the images the tower sees (backbones.input_side)."""
    from edgevlm.export import graphs, mobile, weights

    path = out / contract.graph_file(component, precision)
    traced = path if precision.floating else out / ".float" / path.name
    scores = cfg.token_select == "visionzip"
    if shapes is None:
        module = graphs.wrapper(component, model, scores)
        args = (module.example_inputs() if hasattr(module, "example_inputs")  # a family's own
                else graphs.example_inputs(component, model.config, side))
    else:
        module = mobile.wrapper(component, model, shapes)
        args = mobile.example_inputs(component, model.config, shapes)
    onnx_io.trace_to_onnx(module, args, traced,
                          contract.graph_io(component, num_layers, cfg.profile, scores=scores,
                                            **family_of(model).graph_options(model.config)),
                          cfg.opset,
                          static=shapes is not None)
    return traced, weights.attach(traced, module, cfg.external_data)


def _finish(component: str, precision: Precision, traced: Path, external: bool, out: Path,
            cfg: ExportConfig, checkpoint: dict | None = None, built: bool = False
            ) -> ComponentFile:
    """Quantization (if any) and the checker for one traced graph (a built one is checked by
    onnxruntime, whose SimplifiedLayerNormalization the onnx checker does not know)."""
    path = out / contract.graph_file(component, precision)
    kept: tuple[str, ...] = ()
    if traced != path:
        prec.quantize(component, precision, traced, path, cfg.block_size, external, checkpoint)
        for f in traced.parent.glob(traced.name + "*"):
            f.unlink()
        if external:  # onnxruntime names its data file <graph>.onnx.data; use the contract's
            onnx_io.gather_external_data(path)
        kept = prec.float_weights(path)
        if kept:
            log.warning("%s %s: %d weight matri%s kept in float (%s)", component, precision,
                        len(kept), "x" if len(kept) == 1 else "ces", ", ".join(kept))
    if cfg.profile is Profile.MOBILE:
        onnx_io.fold_constants(path, external)
    onnx_io.check(path, ort_ops=built)
    data = onnx_io.data_file(path)
    return ComponentFile(path.relative_to(out).as_posix(), precision, onnx_io.graph_bytes(path),
                         data.relative_to(out).as_posix() if data.exists() else None, kept)


def _mobile_extras(tmp: Path, files: dict[str, ComponentFile], shapes, rope,
                   config: ExportConfig) -> dict:
    """The mobile profile's rotary table, readiness figures and ORT-format graphs, as manifest
    entries."""
    import numpy as np

    np.save(tmp / contract.ROPE_FILE, rope)
    out = {"static_shapes": shapes.to_dict(), "rope_file": contract.ROPE_FILE}
    if config.readiness:
        graphs = {c: tmp / f.file for c, f in files.items()}
        measured = readiness.measure(graphs)
        for miss in measured.misses:
            log.warning("mobile readiness: %s", miss)
        out["readiness"] = measured
        ort_files = readiness.to_ort_format(graphs)
        out["ort_format"] = {c: p.relative_to(tmp).as_posix() for c, p in ort_files.items()}
    return out


def _int8_vision(model, loaded, config: ExportConfig, checkpoint: dict, automatic: bool):
    """An int8 vision encoder carries edgevlm's own integers (edgevlm.export.vision_int8; a
    checkpoint's 8-bit vision layers keep theirs). Returns (config, manifest entry, gate
    reference, {component: integers} for the quantizer): an automatic int8 tower (`--precision
    int4` without --vision-precision) whose features move more than the budget is exported in
    fp32 instead, and says so."""
    from edgevlm.export import vision_int8
    from edgevlm.export.graphs import wrapper
    from edgevlm.export.validate import vision_inputs

    if config.precisions()["vision_encoder"] is not Precision.INT8:
        return config, None, None, {}
    module = wrapper("vision_encoder", model)
    found = {**vision_int8.weights(module), **checkpoint.get("vision_encoder", {})}
    cost = vision_int8.cost(module, found, vision_inputs(loaded))
    if automatic and not cost.within:
        entry = cost.to_dict("fp32", automatic)
        log.warning("vision_encoder: %s (give --vision-precision int8 to export it in int8 "
                    "anyway)", entry["why"])
        return replace(config, vision_precision=Precision.FP32), entry, None, {}
    return config, cost.to_dict("int8", automatic), cost, {"vision_encoder": found}


def _settle_config(model_dir: Path, model_cfg: dict, config: ExportConfig):
    """The export's config once the model folder's config.json is read: its trained token count,
    the checkpoint's block size, the automatic int8 tower. Every flag the model cannot take fails
    here, before minutes of loading. Returns (config, checkpoint source or None, whether the
    int8 tower is the automatic choice)."""
    family = family_of(model_cfg)
    config = images.trained_token_setting(config, model_cfg, model_dir)
    if config.image_splitting is not None and not family.tiled:
        raise UserError(f"--{'' if config.image_splitting else 'no-'}image-splitting sets how a "
                        f"tiled family (idefics3) cuts images; {model_dir} holds a "
                        f"{family.name} model, which takes one image as it is: drop the flag")
    if config.visual_tokens is not None and family.tiled:
        raise UserError(f"--visual-tokens works on llava and qwen2_vl models so far; {model_dir} "
                        f"holds a model of the {family.name} family, whose image tokens come in "
                        "tiles of a grid (not supported yet): export it without --visual-tokens")
    if config.token_select == "visionzip" and family.image_layout == "patches":
        raise UserError(f"--token-select visionzip ranks tokens by the tower's attention scores, "
                        f"which a {family.name} vision graph does not output; use divprune")
    if (config.min_pixels or config.max_pixels) and family.set_pixel_bounds is None:
        raise UserError(f"--min-pixels / --max-pixels bound a {family.name} model's images only "
                        "if its processor resizes each image to its own size (Qwen2-VL); drop "
                        "them")
    if config.profile is Profile.MOBILE and family.image_layout == "patches":
        raise UserError(f"--profile mobile fixes every graph's shapes, and a {family.name} "
                        "model's vision graph takes each image at its own resolution (no "
                        "fixed-grid graph yet): export it with the default or gpu profile")
    source = ckpt.check_source(model_dir)
    group = source.group_size if source is not None else None
    config = replace(config, block_size=ckpt.block_size(config, group, model_dir))
    automatic = (config.precision is Precision.INT4 and config.vision_precision is None
                 and config.profile is Profile.DEFAULT
                 and not (source is not None and ckpt.quantized_vision(model_dir)))
    if automatic:
        config = replace(config, vision_precision=INT4_VISION)
    return config, source, automatic


@dataclass
class _Plan:
    """What the export writes, settled with the model loaded and before any graph is traced."""

    config: ExportConfig
    dims: Any  # edgevlm.export.graphs.TextDims
    choice: dec.DecoderChoice
    checkpoint: dict  # {component: the checkpoint's integers}
    own: dict  # {component: edgevlm's own integers} (the int8 vision tower)
    vision_entry: dict | None  # edgevlm.json "vision_int8"
    vision_carried: Any = None  # the int8 tower's gate reference
    shapes: Any = None  # mobile: edgevlm.export.mobile.StaticShapes
    rope: Any = None  # mobile: the rotary table
    side: int | None = None  # the images the tower sees (backbones.input_side)
    ref: Any = None  # edgevlm.export.reference.Reference, unless --no-validate
    decoder_plan: Any = None  # a quantized builder decoder's integers
    carried: Any = None  # the reference the built decoder is held to: the same integers

    @property
    def precisions(self) -> dict[str, str]:
        return self.config.precisions()


def _plan(loaded, config: ExportConfig, source, automatic: bool, model_dir: Path) -> _Plan:
    """Settle the decoder kind, the integers each component carries, the mobile shapes and the
    torch references, failing before minutes of tracing."""
    from edgevlm.export.graphs import text_dims
    from edgevlm.export.validate import torch_reference

    model = loaded.model
    images.set_image_splitting(loaded, family_of(model), config, model_dir)
    if config.visual_tokens is not None:
        token_select.check(config.visual_tokens, loaded.num_image_tokens)
    choice = dec.choose(config, model.config)  # before minutes of validating and tracing
    checkpoint = ({} if source is None
                  else ckpt.checkpoint_weights(model, model_dir, config.precisions(), source))
    config, vision_entry, vision_carried, own = _int8_vision(model, loaded, config, checkpoint,
                                                             automatic)
    if source is not None and source.mixed:
        ckpt.check_mixed(checkpoint, choice.kind is DecoderKind.BUILDER)
    p = _Plan(config, text_dims(model.config), choice, checkpoint, own, vision_entry,
              vision_carried)
    p.side = input_side(model.config.vision_config, loaded.processor.image_processor)
    if config.profile is Profile.MOBILE:
        from edgevlm.export import mobile

        mobile.check_supported(model)
        p.shapes = mobile.static_shapes(model.config, config.max_context, side=p.side)
        p.rope = mobile.rope_table(model, p.shapes.context)
    p.ref = torch_reference(loaded, config.new_tokens) if config.validate else None
    if p.ref is not None:
        dec.check_context(choice, p.ref)
    precision = p.precisions[dec.DECODER]
    if choice.kind is DecoderKind.BUILDER and precision in ckpt.QUANTIZED:
        p.decoder_plan = dec.plan(model, precision, config.block_size,
                                  checkpoint.get(dec.DECODER))
        if p.ref is not None:  # the reference the built decoder is held to: the same integers
            dec.carry(model, p.decoder_plan)
            p.carried = (torch_reference(loaded, config.new_tokens) if p.decoder_plan.rounded
                         else p.ref)
    return p


def _trace_graphs(loaded, p: _Plan, tmp: Path, order: list[str], bar) -> tuple[dict, Any, dict]:
    """Trace (or build) every component into `tmp`; returns ({component: (graph, external)},
    the built decoder or None, the manifest dict without its components)."""
    import torch

    from edgevlm.export import manifest

    model = loaded.model
    # Trace attention as written out (matmul, softmax, matmul): the tracer's translation of
    # torch's fused SDPA turns fp16 attention into float32 and keeps o_proj weights in float32.
    # Same math; parity against the default (SDPA) model shows it.
    model.set_attn_implementation("eager")
    traced, built = {}, None
    for component in order:
        precision = p.precisions[component]
        if precision.half and model.dtype != torch.float16:
            model.half()  # fp16 graphs come last: this turns the model in place
        if component == dec.DECODER and p.choice.kind is DecoderKind.BUILDER:
            built = dec.build(model, tmp, precision, p.choice, p.decoder_plan, p.config.opset)
            traced[component] = built.path, True
        else:
            traced[component] = _trace(model, component, precision, tmp, p.config,
                                       p.dims.num_layers, p.shapes, p.side)
        bar.update(1)
    info = manifest.build(loaded, p.dims, p.config,
                          ckpt.weight_sources(p.precisions, p.checkpoint))
    if p.vision_entry is not None:
        info["vision_int8"] = p.vision_entry
    info["io"][dec.DECODER] = contract.graph_io(
        dec.DECODER, p.dims.num_layers, p.config.profile, p.choice.kind,
        mrope=family_of(model).positions == "mrope").to_dict()
    genai = dec.write_genai(model, built, tmp, info, p.config.profile) if built else None
    info["decoder"] = dec.manifest_entry(p.choice, built, genai)
    return traced, built, info


def _complete(tmp: Path, model_dir: Path, p: _Plan, files: dict[str, ComponentFile],
              info: dict, bar) -> tuple[Parity | None, readiness.Readiness | None]:
    """The model's own files, the mobile extras, parity with torch, and edgevlm.json; returns
    the parity and the mobile readiness measured (or None)."""
    from edgevlm.export import manifest
    from edgevlm.export.validate import validate

    shutil.rmtree(tmp / ".float", ignore_errors=True)
    manifest.copy_model_files(model_dir, tmp)
    manifest.write_processor_files(tmp, info)
    images.pixel_bounds_into_files(tmp, info, p.config)
    dec.write_genai_images(tmp, info, files)  # onnxruntime-genai's image pipeline, if it has one
    info["components"] = {c: asdict(f) for c, f in sorted(files.items())}
    if p.shapes is not None:
        info.update(_mobile_extras(tmp, files, p.shapes, p.rope, p.config))
    parity = None
    if p.ref is not None:
        parity = validate({c: tmp / f.file for c, f in files.items()}, p.precisions, p.ref,
                          p.dims, p.rope, p.choice.kind, p.carried, p.choice.accuracy_level,
                          p.choice.activations, p.vision_carried)
        info["parity"] = parity.to_dict()
        bar.update(1)
    if parity is not None and not parity.passed:
        raise ParityError(f"exported graphs do not match torch: {'; '.join(parity.failures)}"
                          " (nothing was written; --no-validate exports anyway)", parity)
    measured = info.get("readiness")
    if measured is not None:
        info["readiness"] = measured.to_dict()
    (tmp / contract.MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
    return parity, measured


def export(model_dir: str | Path, out_dir: str | Path, config: ExportConfig = ExportConfig(),
           quiet: bool = True) -> ExportResult:
    """Export a model folder of any family edgevlm knows to an ONNX export folder; see the module
    docstring."""
    from edgevlm.atomic import atomic_dir, check_new
    from edgevlm.models import load_model, read_config
    from edgevlm.progress import Progress, note

    t0 = time.time()
    model_dir, out = Path(model_dir), Path(out_dir)
    config, source, automatic = _settle_config(model_dir, read_config(model_dir), config)
    check_new(out, config.overwrite, [model_dir])  # before minutes of loading and tracing
    # A quantized checkpoint loads as float Linears holding exactly (q − z)·s: the graphs are
    # traced from, and validated against, the model its integers define. The graphs hold the
    # whole tower: a model trained at fewer tokens selects in the runtime.
    note(f"loading model {model_dir} ...", enabled=not quiet)
    loaded = images.set_pixel_bounds(load_model(model_dir, dequantize=source is not None,
                                          reduce_tokens=False), config)
    p = _plan(loaded, config, source, automatic, model_dir)
    order = sorted(contract.COMPONENTS, key=lambda c: p.precisions[c].half)
    with atomic_dir(out, p.config.overwrite, [model_dir]) as tmp, \
            Progress("export", 2 * len(order) + p.config.validate, enabled=not quiet) as bar:
        traced, built, info = _trace_graphs(loaded, p, tmp, order, bar)
        # Every graph is written: free the torch weights before the quantizers and onnxruntime
        # load the graphs, so those never sit beside a torch copy.
        del loaded
        gc.collect()
        files: dict[str, ComponentFile] = {}
        for component in order:
            files[component] = _finish(component, p.precisions[component], *traced[component],
                                       tmp, p.config, {**p.checkpoint, **p.own}.get(component),
                                       built is not None and component == dec.DECODER)
            bar.update(1)
        parity, measured = _complete(tmp, model_dir, p, files, info, bar)
    return ExportResult(out, files, parity, time.time() - t0, measured, info["decoder"],
                        p.vision_entry)
