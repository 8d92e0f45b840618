"""`export(model_dir, out_dir, ExportConfig(...))`: a LLaVA checkpoint to ONNX graphs.

Writes the layout of runtime/contract.py (the transformers.js / SmolVLM ONNX release layout):
onnx/{vision_encoder,embed_tokens,decoder_model_merged}{suffix}.onnx, the model's config,
tokenizer and processor files, and edgevlm.json. The folder is built beside OUT and renamed
into place only when every graph has passed the checker and, unless disabled, parity with torch.

Memory: the torch model is loaded once and each graph's weights are streamed from it tensor by
tensor (edgevlm.export.weights). Graphs derived from fp32 (fp32, int8, int4) are traced first;
then, only if some component is fp16, the model is turned to half precision in place and those
are traced. The torch model is freed before the quantizers and onnxruntime load the graphs.
Measured in benchmarks/export_memory.py.

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

from edgevlm.errors import UserError
from edgevlm.export import decoder as dec
from edgevlm.export import int4, onnx_io, readiness
from edgevlm.export import precision as prec
from edgevlm.export import source as ckpt
from edgevlm.export.validate import Parity
from edgevlm.families import family_of
from edgevlm.runtime import contract, token_select
from edgevlm.runtime.contract import Precision

log = logging.getLogger(__name__)


class ParityError(UserError):
    """The exported graphs do not match torch within the stated tolerances."""

    def __init__(self, message: str, parity: Parity):
        super().__init__(message)
        self.parity = parity


# Component precisions each profile picks when none is given (decoder, vision, embedding).
# gpu: fp16 for the compute-bound vision tower, MatMulNBits int4 for the memory-bound decoder;
# the fp16 graphs keep RoPE, RMSNorm statistics and softmax in float32 as torch computes them.
PROFILE_PRECISIONS = {"default": ("fp32", None, None), "mobile": ("fp16", None, None),
                      "gpu": ("int4", "fp16", "fp16")}
MOBILE_PRECISIONS = ("fp16",)  # what NNAPI and CoreML run without CPU fallback for the math
# The decoder each profile writes when --decoder is not given (edgevlm.export.decoder): built from
# the weights with onnxruntime's fused ops, except on mobile, whose static graphs are traced.
PROFILE_DECODERS = {"default": "builder", "mobile": "traced", "gpu": "builder"}
# The vision encoder of a `--precision int4` export when --vision-precision is not given: int8
# (MatMulInteger) runs the SigLIP-224 tower of the SmolLM2 LLaVA in 4.2 ms against 12.1 ms as
# int4 MatMulNBits on this AVX2 CPU (benchmarks/results/runtime_speed.json, "vision"), and rounds
# less. A checkpoint that quantized its vision layers to 4 bits keeps them (its own integers).
INT4_VISION = Precision.INT8


@dataclass(frozen=True)
class ExportConfig:
    precision: str | None = None  # decoder, and the default for the other components; None:
    # the profile's (PROFILE_PRECISIONS)
    vision_precision: str | None = None  # None: the profile's, else same as `precision`
    embed_precision: str | None = None  # None: the profile's, else same as `precision`
    block_size: int | None = None  # int4: input channels per scale / zero point; None: the
    # quantized checkpoint's group size, else DEFAULT_BLOCK
    opset: int = 17
    validate: bool = True
    overwrite: bool = False
    external_data: bool | None = None  # None: weights in <graph>.onnx_data above 1 GB
    new_tokens: int = 32  # greedy tokens compared with torch when validating
    profile: str = "default"  # default | mobile (static shapes, NPU ops) | gpu
    max_context: int | None = None  # mobile: cache slots; None: min(model limit, 1024)
    readiness: bool = True  # mobile: measure NNAPI/CoreML coverage (and the ORT-format files)
    decoder: str | None = None  # traced | builder; None: the profile's (PROFILE_DECODERS), which
    # falls back to traced for a text model the builder does not cover
    accuracy_level: int | None = None  # builder int4/int8: MatMulNBits accuracy_level; None:
    # the profile's (edgevlm.export.builder.linear.ACCURACY_LEVELS)
    visual_tokens: int | None = None  # image tokens the decoder sees (runtime.token_select)
    token_select: str | None = None  # divprune | visionzip, with visual_tokens
    image_splitting: bool | None = None  # a tiled family's recipe: split images into tiles;
    # None: the model's processor's setting

    def __post_init__(self):
        if self.profile not in contract.PROFILES:
            raise UserError(f"--profile {self.profile!r} is unknown; choose one of "
                            f"{', '.join(contract.PROFILES)}")
        if self.precision is None:  # the profile's choice, written down for the manifest
            p, v, e = PROFILE_PRECISIONS[self.profile]
            object.__setattr__(self, "precision", p)
            object.__setattr__(self, "vision_precision", self.vision_precision or v)
            object.__setattr__(self, "embed_precision", self.embed_precision or e)
        for name in ("precision", "vision_precision", "embed_precision"):
            value = getattr(self, name)
            if value is not None and value not in contract.PRECISIONS:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {value!r} is not a precision; choose one of "
                                f"{', '.join(contract.PRECISIONS)}")
            if value is not None:
                object.__setattr__(self, name, Precision(value))
                value = getattr(self, name)
            if self.profile == "mobile" and value is not None and value not in MOBILE_PRECISIONS:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {value} is not available with --profile mobile: its "
                                f"graphs are {', '.join(MOBILE_PRECISIONS)} (int8 and int4 "
                                "here are CPU kernels, MatMulInteger and MatMulNBits, that "
                                "neither NNAPI nor CoreML runs); drop the flag")
        if self.block_size is not None:
            int4.check_block_size(self.block_size)
        if not 14 <= self.opset <= 21:
            raise UserError(f"opset {self.opset} is out of range; use 14..21 (attention needs "
                            "at least 14; 17 is the default)")
        if self.new_tokens < 1:
            raise UserError(f"new_tokens {self.new_tokens} must be at least 1")
        if self.decoder not in (None, *contract.DECODER_KINDS):
            raise UserError(f"--decoder {self.decoder!r} is unknown; choose one of "
                            f"{', '.join(contract.DECODER_KINDS)}")
        if self.decoder == "builder" and self.profile == "mobile":
            raise UserError("--decoder builder is not available with --profile mobile (its "
                            "static graphs are traced); drop --decoder")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"--accuracy-level {self.accuracy_level} is not one of MatMulNBits' "
                            "0 (float compute), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
        if self.max_context is not None and self.profile != "mobile" \
                and self.decoder_kind != "builder":
            raise UserError("--max-context sets the mobile profile's fixed cache or the builder "
                            "decoder's KV buffer; use it with --profile mobile or --decoder "
                            "builder")
        if self.max_context is not None and self.max_context < 2:
            raise UserError(f"--max-context {self.max_context} must be at least 2")
        if (self.visual_tokens is None) != (self.token_select is None):
            raise UserError("--visual-tokens N and --token-select METHOD go together: give both "
                            f"(methods: {', '.join(token_select.METHODS)}) or neither")
        if self.token_select is not None and self.token_select not in token_select.METHODS:
            raise UserError(f"--token-select {self.token_select!r} is unknown; choose one of "
                            f"{', '.join(token_select.METHODS)}")
        if self.visual_tokens is not None and self.visual_tokens < 1:
            raise UserError(f"--visual-tokens {self.visual_tokens} must be at least 1")
        if self.token_select == "visionzip" and self.profile == "mobile":
            raise UserError("--token-select visionzip needs the default profile's vision graph "
                            "(it adds an attention output); use divprune with --profile mobile")

    @property
    def decoder_kind(self) -> str:
        """The decoder asked for, with the profile's default resolved."""
        return self.decoder or PROFILE_DECODERS[self.profile]

    def precisions(self) -> dict[str, str]:
        return {"vision_encoder": self.vision_precision or self.precision,
                "embed_tokens": self.embed_precision or self.precision,
                "decoder_model_merged": self.precision}


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


def _trace(model, component: str, precision: str, out: Path, cfg: ExportConfig,
           num_layers: int, shapes=None) -> tuple[Path, bool]:
    """Trace one component and write its weights; int8/int4 ones go to a scratch float graph
    that `_finish` quantizes. Returns the graph's path and whether its weights are external.
    `shapes` (edgevlm.export.mobile.StaticShapes) traces the mobile graphs with every axis
    fixed."""
    from edgevlm.export import graphs, mobile, weights

    path = out / contract.graph_file(component, precision)
    traced = path if Precision(precision).floating else out / ".float" / path.name
    scores = cfg.token_select == "visionzip"
    if shapes is None:
        module = graphs.wrapper(component, model, scores)
        args = graphs.example_inputs(component, model.config)
    else:
        module = mobile.wrapper(component, model)
        args = mobile.example_inputs(component, model.config, shapes)
    onnx_io.trace_to_onnx(module, args, traced,
                          contract.graph_io(component, num_layers, cfg.profile,
                                            family=family_of(model).name, scores=scores),
                          cfg.opset,
                          static=shapes is not None)
    return traced, weights.attach(traced, module, cfg.external_data)


def _finish(component: str, precision: str, traced: Path, external: bool, out: Path,
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
    if cfg.profile == "mobile":
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


EXPORTABLE_FAMILIES = ("llava", "idefics3")


def _set_image_splitting(loaded, config: ExportConfig, model_dir: Path) -> None:
    """A tiled model's image recipe for the export: the processor's, or --[no-]image-splitting.
    The reference, the manifest and the processor files all read it from the processor. The
    mobile profile's vision graph takes a fixed tile count, which splitting does not give (1 to
    many tiles by aspect ratio): it takes the global image only."""
    if not family_of(loaded.model).expansion_needs_image:
        return
    images = loaded.processor.image_processor
    if config.image_splitting is not None:
        images.do_image_splitting = config.image_splitting
    if config.profile == "mobile" and images.do_image_splitting:
        raise UserError(f"--profile mobile traces the vision encoder at a fixed tile count, but "
                        f"{model_dir}'s image processor splits images (do_image_splitting: 1 "
                        "to many tiles by aspect ratio); add --no-image-splitting (each image "
                        f"is its one global tile, {loaded.num_image_tokens} tokens) or export "
                        "with --profile default")


def _trained_token_setting(config: ExportConfig, model_cfg: dict, model_dir: Path
                           ) -> ExportConfig:
    """A model trained at fewer visual tokens (edgevlm.token_reduce) exports at that count."""
    from edgevlm.token_reduce import CONFIG_KEY

    trained = model_cfg.get(CONFIG_KEY)
    if not trained:
        return config
    if config.visual_tokens is None:
        return replace(config, visual_tokens=trained["tokens"], token_select=trained["method"])
    if (config.visual_tokens, config.token_select) != (trained["tokens"], trained["method"]):
        raise UserError(f"{model_dir} was trained at {trained['tokens']} visual tokens "
                        f"({trained['method']}); export it with those (drop --visual-tokens) "
                        "or export its full-token parent")
    return config


def export(model_dir: str | Path, out_dir: str | Path, config: ExportConfig = ExportConfig(),
           quiet: bool = True) -> ExportResult:
    """Export a LLaVA-family model folder to an ONNX export folder; see the module docstring."""
    import torch

    from edgevlm.atomic import atomic_dir, check_new
    from edgevlm.export import manifest
    from edgevlm.export.graphs import text_dims
    from edgevlm.export.validate import torch_reference, validate
    from edgevlm.models import load_model
    from edgevlm.progress import Progress

    t0 = time.time()
    model_dir, out = Path(model_dir), Path(out_dir)
    from edgevlm.models import read_config

    model_cfg = read_config(model_dir)
    family = family_of(model_cfg)
    config = _trained_token_setting(config, model_cfg, model_dir)
    if config.image_splitting is not None and not family.expansion_needs_image:
        raise UserError(f"--{'' if config.image_splitting else 'no-'}image-splitting sets how a "
                        f"tiled family (idefics3) cuts images; {model_dir} holds a "
                        f"{family.name} model, which takes one image as it is: drop the flag")
    if config.visual_tokens is not None and family.name != "llava":
        raise UserError(f"--visual-tokens works on llava models so far; {model_dir} holds a "
                        f"model of the {family.name} family, whose image tokens come in tiles "
                        "of a grid (not supported yet): export it without --visual-tokens")
    if family.name not in EXPORTABLE_FAMILIES:
        raise UserError(f"{model_dir} holds a model of the {family.name} family; export writes "
                        f"{', '.join(EXPORTABLE_FAMILIES)} models only so far; train, eval, "
                        "distill, quantize and bench of the model folder work for it")
    source = ckpt.check_source(model_dir)
    group = source.group_size if source is not None else None
    config = replace(config, block_size=ckpt.block_size(config, group, model_dir))
    if (config.precision is Precision.INT4 and config.vision_precision is None
            and config.profile == "default"
            and not (source is not None and ckpt.quantized_vision(model_dir))):
        config = replace(config, vision_precision=INT4_VISION)
    check_new(out, config.overwrite, [model_dir])  # before minutes of loading and tracing
    # A quantized checkpoint loads as float Linears holding exactly (q − z)·s: the graphs are
    # traced from, and validated against, the model its integers define.
    # the graphs hold the whole tower: a model trained at fewer tokens selects in the runtime
    loaded = load_model(model_dir, dequantize=source is not None, reduce_tokens=False)
    model = loaded.model
    _set_image_splitting(loaded, config, model_dir)
    if config.visual_tokens is not None:
        token_select.check(config.visual_tokens, loaded.num_image_tokens)
    dims = text_dims(model.config)
    precisions = config.precisions()
    choice = dec.choose(config, model.config)  # before minutes of validating and tracing
    checkpoint = ({} if source is None
                  else ckpt.checkpoint_weights(model, model_dir, precisions, source))
    shapes = rope = None
    if config.profile == "mobile":
        from edgevlm.export import mobile

        mobile.check_supported(model)
        shapes = mobile.static_shapes(model.config, config.max_context)
        rope = mobile.rope_table(model, shapes.context)
    ref = torch_reference(loaded, config.new_tokens) if config.validate else None
    if ref is not None:
        dec.check_context(choice, ref)
    plan = carried = None
    if choice.kind == "builder" and precisions[dec.DECODER] in ckpt.QUANTIZED:
        plan = dec.plan(model, precisions[dec.DECODER], config.block_size,
                        checkpoint.get(dec.DECODER))
        if ref is not None:  # the reference the built decoder is held to: the same integers
            dec.carry(model, plan)
            carried = torch_reference(loaded, config.new_tokens) if plan.rounded else ref
    # Trace attention as written out (matmul, softmax, matmul): the tracer's translation of
    # torch's fused SDPA turns fp16 attention into float32 and keeps o_proj weights in float32.
    # Same math; parity against the default (SDPA) model above shows it.
    model.set_attn_implementation("eager")

    # fp16 graphs come last: tracing them turns the model to half precision in place.
    order = sorted(contract.COMPONENTS, key=lambda c: Precision(precisions[c]).half)
    with atomic_dir(out, config.overwrite, [model_dir]) as tmp, \
            Progress("export", 2 * len(order) + config.validate, enabled=not quiet) as bar:
        traced, built = {}, None
        for component in order:
            if Precision(precisions[component]).half and model.dtype != torch.float16:
                model.half()
            if component == dec.DECODER and choice.kind == "builder":
                built = dec.build(model, tmp, precisions[component], choice, plan, config.opset)
                traced[component] = built.path, True
            else:
                traced[component] = _trace(model, component, precisions[component], tmp,
                                           config, dims.num_layers, shapes)
            bar.update(1)
        info = manifest.build(loaded, dims, config, ckpt.weight_sources(precisions, checkpoint))
        info["io"][dec.DECODER] = contract.graph_io(dec.DECODER, dims.num_layers, config.profile,
                                                    choice.kind).to_dict()
        genai = dec.write_genai(model, built, tmp, info, config.profile) if built else None
        info["decoder"] = dec.manifest_entry(choice, built, genai)
        # Every graph is written: free the torch weights before the quantizers and onnxruntime
        # load the graphs, so those never sit beside a torch copy.
        del loaded, model
        gc.collect()
        files: dict[str, ComponentFile] = {}
        for component in order:
            files[component] = _finish(component, precisions[component], *traced[component],
                                       tmp, config, checkpoint.get(component),
                                       built is not None and component == dec.DECODER)
            bar.update(1)
        shutil.rmtree(tmp / ".float", ignore_errors=True)
        manifest.copy_model_files(model_dir, tmp)
        manifest.write_processor_files(tmp, info)
        info["components"] = {c: asdict(f) for c, f in sorted(files.items())}
        if shapes is not None:
            info.update(_mobile_extras(tmp, files, shapes, rope, config))
        parity = None
        if ref is not None:
            parity = validate({c: tmp / f.file for c, f in files.items()}, precisions, ref, dims,
                              rope, choice.kind, carried, choice.accuracy_level,
                              choice.activations or "fp32")
            info["parity"] = parity.to_dict()
            bar.update(1)
        if parity is not None and not parity.passed:
            raise ParityError(f"exported graphs do not match torch: {'; '.join(parity.failures)}"
                              " (nothing was written; --no-validate exports anyway)", parity)
        measured = info.get("readiness")
        if measured is not None:
            info["readiness"] = measured.to_dict()
        (tmp / contract.MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
    return ExportResult(out, files, parity, time.time() - t0, measured, info["decoder"])
