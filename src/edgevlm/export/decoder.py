"""Which decoder an export writes, traced or built, and the built one's integers and files.

`--decoder builder` (the default of the default and gpu profiles) writes the decoder graph from
the weights (edgevlm.export.builder) for the text families the builder covers; any other text
model falls back to the traced decoder, with the reason in the export summary and edgevlm.json.
Named explicitly, a builder the model cannot take is a UserError instead. `--decoder traced` is
torch.onnx over transformers' modules (edgevlm.export.graphs), the parity reference.

A built int4/int8 decoder's integers are decided here once (edgevlm.export.builder.linear.plan)
and, when validating, carried into the torch model, so parity compares the graph with a torch
model that holds the very same weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.export.source import QUANTIZED
from edgevlm.families.backbones import is_moe
from edgevlm.runtime import contract
from edgevlm.runtime.contract import Activations, DecoderKind, Precision, Profile

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # builder KV buffer positions when --max-context is not given
DECODER = "decoder_model_merged"


@dataclass(frozen=True)
class DecoderChoice:
    kind: DecoderKind
    requested: DecoderKind  # what the config asked for
    reason: str | None = None  # why the builder was not used
    max_context: int | None = None  # builder: KV buffer positions
    activations: Activations = Activations.FP32  # builder: float type inside the graph and of
    # the KV buffer
    accuracy_level: int | None = None  # builder int4/int8: MatMulNBits accuracy_level


def choose(config, model_config) -> DecoderChoice:
    """The decoder `config` (ExportConfig) gets for `model_config` (a LlavaConfig)."""
    from edgevlm.export.builder.linear import ACCURACY_LEVELS
    from edgevlm.export.builder.spec import unsupported

    tc = model_config.text_config
    moe = is_moe(tc)
    if config.decoder_kind is DecoderKind.TRACED:
        if moe:
            raise UserError("a mixture-of-experts decoder is written by the decoder builder "
                            "only (onnxruntime's MoE / QMoE ops), and "
                            + ("--profile mobile traces its graphs"
                               if config.profile is Profile.MOBILE
                               else "--decoder traced asks for a traced one")
                            + "; export with the default profile and decoder")
        return DecoderChoice(DecoderKind.TRACED, DecoderKind.TRACED)
    reason = unsupported(tc)
    if reason is not None:
        if config.decoder is DecoderKind.BUILDER:  # asked for by name
            raise UserError(f"--decoder builder: {reason}; export with --decoder traced")
        log.warning("decoder: traced, not built (%s)", reason)
        return DecoderChoice(DecoderKind.TRACED, DecoderKind.BUILDER, reason)
    limit = tc.max_position_embeddings
    context = config.max_context or min(limit, DEFAULT_CONTEXT)
    if context > limit:
        raise UserError(f"--max-context {context} is over the model's max_position_embeddings "
                        f"{limit}; use at most {limit}")
    precision = config.precision
    gpu = config.profile is Profile.GPU
    activations = Activations.FP16 if precision.half or gpu else Activations.FP32
    if moe and gpu and precision in QUANTIZED:
        raise UserError("an int4/int8 mixture-of-experts decoder for --profile gpu: CUDA's QMoE "
                        "kernel has no block-wise weights (onnxruntime#29035), so the graph "
                        "would not open on CUDA; export --profile gpu --precision fp16, or "
                        "int4 with the default (CPU) profile")
    level = None
    if precision in QUANTIZED:
        level = (config.accuracy_level if config.accuracy_level is not None
                 else ACCURACY_LEVELS[config.profile])
    return DecoderChoice(DecoderKind.BUILDER, DecoderKind.BUILDER, None, context, activations,
                         level)


def check_context(choice: DecoderChoice, ref) -> None:
    """Validation runs a prompt and its answer through the KV buffer: they must fit."""
    need = ref.input_ids.shape[1] + len(ref.tokens)
    if choice.kind is DecoderKind.BUILDER and need > choice.max_context:
        raise UserError(f"validation needs {need} positions (its prompt and {len(ref.tokens)} "
                        f"new tokens) but --max-context is {choice.max_context}; give at least "
                        f"--max-context {need}, or --no-validate")


@dataclass(frozen=True)
class Plan:
    """A built quantized decoder's integers: {graph weight name: NBitsWeight}, and the names
    rounded here (the rest are the checkpoint's own)."""

    weights: dict
    rounded: frozenset


def plan(model, precision: Precision, block_size: int, checkpoint: dict | None) -> Plan:
    from edgevlm.export.builder import linear
    from edgevlm.export.graphs import wrapper

    weights, rounded = linear.plan(wrapper(DECODER, model), precision, block_size, checkpoint)
    return Plan(weights, frozenset(rounded))


def carry(model, p: Plan) -> None:
    """The torch model computes with the plan's integers from here on (see linear.carry)."""
    from edgevlm.export.builder import linear
    from edgevlm.export.graphs import wrapper

    linear.carry(wrapper(DECODER, model), p.weights, set(p.rounded))


def build(model, out: Path, precision: Precision, choice: DecoderChoice, p: Plan | None,
          opset: int):
    """Write onnx/decoder_model_merged{sfx}.onnx (+ _data); returns the BuiltDecoder."""
    from edgevlm.export.builder.linear import Linears
    from edgevlm.export.builder.model import FLOAT_TYPES, build_decoder
    from edgevlm.export.graphs import wrapper

    dtype = FLOAT_TYPES[choice.activations][0]
    linears = Linears(dtype) if p is None else Linears(dtype, p.weights, choice.accuracy_level)
    path = out / contract.graph_file(DECODER, precision)
    return build_decoder(wrapper(DECODER, model), path, precision, choice.max_context, linears,
                         choice.activations, max(opset, 17))


@dataclass(frozen=True)
class GenaiFiles:
    """What write_genai wrote: genai_config.json and the text-only graph (None when genai's
    image pipeline runs the decoder as it is: edgevlm.export.genai_vlm)."""

    config: str
    graph: str | None


def write_genai(model, built, out: Path, info: dict, profile: Profile) -> GenaiFiles:
    """genai_config.json and its text-only graph (edgevlm.export.builder.genai). An export
    genai takes images from (Qwen2-VL) gets no text graph: write_genai_images, once every
    graph is final, turns the config into genai's image pipeline."""
    from edgevlm.export import genai_vlm
    from edgevlm.export.builder import genai

    options = [{"cuda": {}}] if profile is Profile.GPU else []
    text = genai_vlm.unsupported(info) is not None
    path = genai.write(built, model.get_input_embeddings().weight, out, info, options, text)
    return GenaiFiles(path.relative_to(out).as_posix(),
                      contract.genai_graph_file(built.precision) if text else None)


def write_genai_images(out: Path, info: dict, files: dict) -> None:
    """genai's image pipeline beside the final graphs (`files`: {component: ComponentFile}),
    recorded in info["decoder"]["genai"]; the reason instead where genai takes no images.
    Nothing for a traced decoder, which has no genai config."""
    from edgevlm.export import genai_vlm

    entry = info["decoder"]
    if entry.get("genai_config") is None:
        return
    written = genai_vlm.write(out, info, {c: (f.file, f.precision) for c, f in files.items()})
    if written.reason == genai_vlm.WINDOWED_REASON:  # the family genai has a pipeline for
        log.warning("genai_config.json: text only (%s)", written.reason)
    entry["genai"] = written.to_dict()


def manifest_entry(choice: DecoderChoice, built=None, genai: GenaiFiles | None = None) -> dict:
    """edgevlm.json "decoder": what was written and why."""
    entry = {"kind": choice.kind, "requested": choice.requested, "fallback_reason": choice.reason}
    if built is not None:
        entry.update(max_context=built.max_context, activations=built.activations,
                     accuracy_level=built.accuracy_level, block_size=built.block_size,
                     nodes=built.nodes, genai_config=genai.config if genai else None,
                     genai_graph=genai.graph if genai else None)
    return entry
