"""What a quantized checkpoint brings to an export: which kind it is, its integers under the
traced graphs' weight names, and the checks that keep them from being re-rounded.

`edgevlm quantize` writes compressed-tensors pack-quantized checkpoints. Two kinds can reach a
graph as they are: 4 bits in groups (MatMulNBits, block size = group size; a group size that
does not divide a layer's width is a ragged last block there, which MatMulNBits takes as it is)
and 8 bits per channel, symmetric (MatMulInteger). A mixed checkpoint (`quantize --layer-bits`)
of 4-bit layers with some at 8 bits, one group size, reaches the built decoder as it is, each
layer a MatMulNBits of its own bits. Layers the checkpoint kept in float take the ordinary path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.export import int4, int8
from edgevlm.runtime.contract import Precision

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 32
QUANTIZED = tuple(p for p in Precision if p.quantized)  # graphs that carry integer weights


@dataclass(frozen=True)
class Source:
    """What a quantized checkpoint's integers can be exported as."""

    precision: str  # "int4" (MatMulNBits) or "int8" (MatMulInteger)
    bits: int
    group_size: int | None  # int4: the block size; int8: None (one scale per output channel)
    mixed: bool = False  # int4 with some layers at 8 bits (`quantize --layer-bits`)


def check_source(model_dir: Path) -> Source | None:
    """The kind of quantized checkpoint (None for a float model), which must be one that
    `edgevlm quantize` writes and MatMulNBits or MatMulInteger can carry as it is."""
    from edgevlm.models import read_config
    from edgevlm.quant.checkpoint import config_groups, mixed_bits, read_scheme

    read_config(model_dir)  # a model folder at all, or its own error
    scheme = read_scheme(model_dir)
    if scheme is None:
        return None
    mixed = mixed_bits(model_dir)
    if mixed:  # `quantize --layer-bits`: MatMulNBits takes each layer's bits
        groups = config_groups(model_dir)
        base = next((a for t, a in groups if "Linear" in t), {})
        sizes = {a.get("group_size") for _, a in groups}
        if (scheme.quant_method == "compressed-tensors" and scheme.format == "pack-quantized"
                and base.get("num_bits") == 4 and set(mixed) == {4, 8}
                and all(a.get("strategy") == "group" for _, a in groups) and len(sizes) == 1
                and isinstance(base.get("group_size"), int)
                and base["group_size"] >= int4.MIN_BLOCK
                and not base["group_size"] & (base["group_size"] - 1)):
            return Source(Precision.INT4, 4, base["group_size"], mixed=True)
        raise UserError(f"{model_dir} mixes {' and '.join(map(str, mixed))}-bit "
                        "layers (`edgevlm quantize --layer-bits`); export carries 4-bit layers "
                        "with some at 8 bits, in groups of one size (e.g. --bits 4 --layer-bits "
                        "v_proj=8); quantize again with such bits, or export without "
                        "--layer-bits")
    group, packed = scheme.group_size, scheme.pack_quantized_int
    if (packed and scheme.num_bits == 4 and scheme.strategy == "group"
            and isinstance(group, int) and group >= int4.MIN_BLOCK and not group & (group - 1)):
        return Source(Precision.INT4, 4, group)
    if (packed and scheme.num_bits == 8 and scheme.strategy == "channel"
            and scheme.symmetric):
        return Source(Precision.INT8, 8, None)
    raise UserError(f"{model_dir}/config.json: quantization_config is not supported; export "
                    "needs a 4-bit pack-quantized checkpoint (compressed-tensors, one group of "
                    f"4-bit int weights, strategy group, group_size a power of two >= "
                    f"{int4.MIN_BLOCK}) as `edgevlm quantize --bits 4` writes, an 8-bit one "
                    "(strategy channel, symmetric) as `edgevlm quantize --bits 8 --group-size -1 "
                    "--symmetric` writes, or the unquantized model")


def quantized_vision(model_dir: Path) -> bool:
    """Whether the checkpoint holds packed integers for vision-tower layers (`quantize
    --quantize-vision`); read from the safetensors headers only."""
    from edgevlm.families import family_of
    from edgevlm.models import read_config
    from edgevlm.quant.checkpoint import packed_module_names

    family = family_of(read_config(model_dir))
    return any(family.owns(n, "vision_tower") for n in packed_module_names(model_dir))


def block_size(config, group: int | None, model_dir: Path) -> int:
    """The int4 block size: the checkpoint's group size, else --block-size or the default."""
    if group is None:
        return config.block_size or DEFAULT_BLOCK
    if config.block_size not in (None, group):
        raise UserError(f"--block-size {config.block_size} conflicts with the group size {group} "
                        f"of the quantized checkpoint {model_dir}; drop --block-size or give "
                        f"--block-size {group}")
    return group


def _read_checkpoint(model_dir: Path, source: Source) -> dict:
    """{module name: Int4Weight | Int8Weight, or NBitsWeight for the 8-bit layers of a mixed
    int4 checkpoint}: the checkpoint's integers per layer."""
    from edgevlm.export.builder.linear import NBitsWeight
    from edgevlm.quant.checkpoint import read_int8_layers, read_nbits_layers

    if source.precision is Precision.INT4:  # a mixed checkpoint's 8-bit layers as they are
        return {n: int4.Int4Weight(q, s, z, g) if bits == 4 else NBitsWeight(q, s, z, bits, g)
                for n, (q, s, z, g, bits) in read_nbits_layers(model_dir).items()}
    return {n: int8.Int8Weight(*v) for n, v in read_int8_layers(model_dir).items()}


def _check_precision(component: str, precision: str, source: Source, layer: str,
                     model_dir: Path) -> None:
    """A component holding checkpoint layers must carry their integers (the checkpoint's
    precision) or their dequantized floats: the other integer precision would re-round them and
    throw away what the search chose."""
    if precision not in QUANTIZED or precision == source.precision:
        return
    flag = {"decoder_model_merged": "--precision", "vision_encoder": "--vision-precision",
            "embed_tokens": "--embed-precision"}[component]
    raise UserError(f"{model_dir} holds {source.bits}-bit weights, but {flag} {precision} would "
                    f"re-round its {component} layers ({layer} ...) to {precision}; export them "
                    f"with {flag} {source.precision} (its integers as they are) or fp32/fp16 "
                    "(its dequantized weights), or quantize the float model with --bits "
                    f"{precision[3:]}")


def checkpoint_weights(model, model_dir: Path, precisions: dict[str, str],
                        source: Source) -> dict[str, dict]:
    """{component: {graph weight name: Int4Weight | Int8Weight}} for the components exported at
    the checkpoint's precision: its integers under the names the traced graph gives those
    layers' weights."""
    from edgevlm.export.graphs import wrapper

    if not any(p in QUANTIZED for p in precisions.values()):
        return {}
    layers = _read_checkpoint(model_dir, source)
    hf_names = {id(m): n for n, m in model.named_modules()}
    out, used = {}, set()
    for component, p in precisions.items():
        if p not in QUANTIZED:
            continue
        modules = list(wrapper(component, model).named_modules())
        held = {f"{name}.weight": hf_names[id(m)] for name, m in modules
                if hf_names.get(id(m)) in layers}
        if held:
            _check_precision(component, p, source, min(held.values()), model_dir)
        out[component] = {w: layers[hf] for w, hf in held.items()}
        used.update(held.values())
        for name, m in modules:  # fused MoE experts, stored one Linear per expert projection
            hf = hf_names.get(id(m))
            if hf is None or f"{hf}.0.gate_proj" not in layers:
                continue
            n = m.gate_up_proj.shape[0]
            per = {p: [f"{hf}.{e}.{p}" for e in range(n)]
                   for p in ("gate_proj", "up_proj", "down_proj")}
            out[component][f"{name}.gate_up_proj"] = [
                (layers[g], layers[u]) for g, u in zip(per["gate_proj"], per["up_proj"])]
            out[component][f"{name}.down_proj"] = [layers[d] for d in per["down_proj"]]
            used.update(k for keys in per.values() for k in keys)
    left = sorted(set(layers) - used)
    if left:  # e.g. vision layers of a checkpoint exported with --vision-precision fp16
        log.warning("%d checkpoint layer(s) exported from their dequantized float weights, not "
                    "as %s (%s ...)", len(left), source.precision, left[0])
    return out


def check_mixed(checkpoint: dict[str, dict], built_decoder: bool) -> None:
    """A mixed checkpoint's 8-bit layers reach MatMulNBits only through the built decoder; the
    traced graphs' int4 pass (export.int4) writes 4-bit layers alone."""
    from edgevlm.export.builder.linear import NBitsWeight

    for component, weights in checkpoint.items():
        if built_decoder and component == "decoder_model_merged":
            continue
        eight = sorted(k for k, w in weights.items() if isinstance(w, NBitsWeight))
        if eight:
            raise UserError(f"the {component} graph holds 8-bit layers of a mixed checkpoint "
                            f"({eight[0]} ...), which export carries only in the built decoder: "
                            "export with --decoder builder (the default) and leave the vision "
                            "tower out of --layer-bits (quantize without --quantize-vision), or "
                            "export that graph in float (--vision-precision fp16)")


def weight_sources(precisions: dict[str, str],
                    checkpoint: dict[str, dict]) -> dict[str, str | None]:
    """{"int4_source" / "int8_source": "checkpoint" or "rtn"} for the manifest: where each
    quantized precision's integers came from; None when no component has that precision."""
    return {f"{q}_source": None if q not in precisions.values() else
            "checkpoint" if any(checkpoint.get(c) for c, p in precisions.items() if p == q)
            else "rtn" for q in QUANTIZED}
