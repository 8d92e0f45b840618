"""Quantized checkpoints in the compressed-tensors `pack-quantized` format, out and back in.

Out (edgevlm.quant.writer's `write_checkpoint`): the model's quantized Linear weights are set to
their exact dequantized values (q − z)·s, compressed-tensors' QuantizationConfig is applied with
one scheme (int, `bits`, group or channel strategy; mixed precision adds one per other bit width,
targeting names) and an explicit `ignore` list of every Linear we left in float, the scale and
zero-point parameters are filled with ours, and ModelCompressor packs the weights. Its `quantize`
computes round(w/s) + z on our exactly-quantized w, which gives back our integers, so the stored
int32 words hold exactly what the search chose. compressed-tensors stores signed integers: q_ct = q
− 2^(b−1), z_ct = z − 2^(b−1) (symmetric: no zero point), and dequantizes (q_ct − z_ct)·s, bit-
identical to our (q − z)·s.

Group sizes: compressed-tensors sizes group scales (N, ceil(K / group_size)) when it sets a
module up (initialize.py, `strategy_cdiv`, only a warning when the division is not exact), but
its quantize and dequantize (forward_helpers.py `_process_group`) raise "tensor column shape
must be divisble by the given group_size" for a ragged last group, so neither packing nor any
load can pass one. One group size per layer would need one config group per size, and
transformers' dequantize-on-load (`CompressedTensorsDequantize` → `get_dense_scheme`) decompresses
every dense layer with the first group's scheme. So a checkpoint holds one group size that
divides every quantized layer's width (`storable_group_size`), and quant_report.json says when
that is smaller than the one asked for.

In (`read_scheme`, `packed_module_names`, `read_nbits_layers`, `read_int8_layers`): this is the
one module that parses a compressed-tensors checkpoint; the exporter (edgevlm.export.source)
asks it. The scheme from config.json's quantization_config, the packed layers' names from the
safetensors headers, and the packed integers, scales and zero points by
Hugging Face module name, unpacked by compressed-tensors; int4 converted back to our unsigned
convention (MatMulNBits stores unsigned nibbles), int8 kept signed (onnxruntime's MatMulInteger
takes int8 weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edgevlm.errors import UserError
from edgevlm.quant.primitives import MIN_GROUP

REPORT = "quant_report.json"


def _legacy_keys(model_dir: str | Path) -> tuple[tuple[str, str], ...]:
    """The family's saved-key prefixes that differ from its module names (transformers 5 saves
    LLaVA in the legacy layout)."""
    from edgevlm.families import family_of

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return family_of(cfg).legacy_keys


def module_name(key: str, legacy: tuple[tuple[str, str], ...]) -> str:
    """The module name (as in `model.named_modules()`) of a saved tensor key."""
    for old, new in legacy:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def storable_group_size(widths: dict[str, int], group_size: int) -> tuple[int, str | None]:
    """The group size a checkpoint can hold for Linears of these input widths when
    `group_size` was asked for, and why it differs (None when it does not): the largest power
    of two <= group_size, >= MIN_GROUP, that divides every width; one group per row (-1)
    when none does."""
    if group_size == -1 or all(w % group_size == 0 for w in widths.values()):
        return group_size, None
    name, width = next((n, w) for n, w in widths.items() if w % group_size)
    g = group_size // 2
    while g >= MIN_GROUP and any(w % g for w in widths.values()):
        g //= 2
    used = g if g >= MIN_GROUP else -1
    what = (f"group size {used}, the largest power of two below {group_size} that divides "
            "every quantized layer's width" if used != -1 else
            f"one group per row (-1): no power of two >= {MIN_GROUP} divides every width")
    return used, (f"group size {group_size} leaves a ragged last group in {name} ({width} wide, "
                  f"{width % group_size} columns left over); compressed-tensors cannot store "
                  f"ragged groups and transformers reads one group size for all layers, so the "
                  f"checkpoint uses {what}")


def is_quantized(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    return path.is_file() and "quantization_config" in json.loads(path.read_text())


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization_config, as far as edgevlm reads it: the weights' arguments
    of its config group (`None` fields where there is not exactly one group)."""

    quant_method: str | None
    format: str | None
    config_groups: int
    num_bits: int | None
    type: str | None
    strategy: str | None  # "group" | "channel" | ...
    group_size: int | None
    symmetric: bool | None

    @property
    def pack_quantized_int(self) -> bool:
        return (self.quant_method == "compressed-tensors" and self.format == "pack-quantized"
                and self.config_groups == 1 and (self.type or "int") == "int")


def mixed_bits(model_dir: str | Path) -> list[int]:
    """The bit widths of a checkpoint's config groups when it has several (`quantize
    --layer-bits`), else []."""
    groups = config_groups(model_dir)
    bits = sorted({args.get("num_bits") for _, args in groups})
    return bits if len(groups) > 1 else []


def decompress(model) -> None:
    """A plainly loaded pack-quantized model's Linears as plain ones holding (q − z)·s exactly,
    as transformers' dequantize-on-load leaves them. That route reads every layer with one
    config group's bits (`get_dense_scheme`), so mixed checkpoints load plainly and come here."""
    model.hf_quantizer.compressor.decompress_model(model)
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            for name in ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
                if hasattr(m, name):
                    delattr(m, name)
            for name in ("quantization_scheme", "quantization_status", "quantization_enabled"):
                if hasattr(m, name):
                    delattr(m, name)


def read_scheme(model_dir: str | Path) -> Scheme | None:
    """The checkpoint's quantization scheme; None for a float model."""
    path = Path(model_dir) / "config.json"
    qcfg = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if qcfg is None:
        return None
    groups = qcfg.get("config_groups") or {}
    args = ([g.get("weights") or {} for g in groups.values()] + [{}])[0] if len(groups) == 1 \
        else {}
    return Scheme(qcfg.get("quant_method"), qcfg.get("format"), len(groups),
                  args.get("num_bits"), args.get("type"), args.get("strategy"),
                  args.get("group_size"), args.get("symmetric"))


def packed_module_names(model_dir: str | Path) -> list[str]:
    """Module names of every packed Linear, from the safetensors headers (no tensor read)."""
    from safetensors import safe_open

    names, legacy = [], _legacy_keys(model_dir)
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names += [module_name(k[: -len(".weight_packed")], legacy) for k in h.keys()
                      if k.endswith(".weight_packed")]
    return names


def config_groups(model_dir: str | Path) -> list[tuple[list[str], dict]]:
    """[(targets, weights arguments)] of each config group in config.json, in order."""
    path = Path(model_dir) / "config.json"
    qcfg = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return [(g.get("targets") or [], g.get("weights") or {})
            for g in ((qcfg or {}).get("config_groups") or {}).values()]


def _group_of(name: str, groups: list[tuple[list[str], dict]]) -> dict:
    """The weights' arguments of the config group that holds module `name`, matched as
    compressed-tensors matches it: an exact name first, then a `re:` pattern, then a class
    target (edgevlm writes only "Linear", which every packed module is)."""
    from compressed_tensors.utils.match import match_name

    ranked = (lambda t: not t.startswith("re:") and match_name(name, t),  # the exact name
              lambda t: t.startswith("re:") and match_name(name, t),  # a pattern
              lambda t: not t.startswith("re:") and t[:1].isupper())  # a class ("Linear")
    for hit in ranked:
        for targets, args in groups:
            if any(hit(t) for t in targets):
                return args
    raise UserError(f"no config group of the checkpoint holds its packed layer {name}; the "
                    "quantization_config does not match its weights (re-run `edgevlm quantize`)")


def _packed_layers(model_dir: str | Path) -> dict[str, tuple]:
    """{module name: (q_ct (N, K) int8, scale (N, G) float32, z_ct (N, G) int8 or None when
    symmetric, args)} in compressed-tensors' signed convention, W = (q_ct − z_ct)·s; `args` are
    the module's own config group's weights arguments (num_bits, symmetric, strategy,
    group_size), so a mixed checkpoint (`quantize --layer-bits`) reads each layer at its bits."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    scheme = read_scheme(model_dir)
    groups = config_groups(model_dir)
    if (scheme is None or scheme.quant_method != "compressed-tensors"
            or scheme.format != "pack-quantized" or not groups
            or any((a.get("type") or "int") != "int" for _, a in groups)):
        raise UserError(f"{model_dir} is not a pack-quantized checkpoint (no quantization_config "
                        "with format pack-quantized); make one with `edgevlm quantize`")
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out, legacy = {}, _legacy_keys(model_dir)
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        args = _group_of(name, groups)
        bits = args["num_bits"]
        shape = tuple(tensors[f"{name}.weight_shape"].tolist())
        scale = tensors[f"{name}.weight_scale"].float()
        q = unpack_from_int32(tensors[key], bits, torch.Size(shape))
        zp = None
        if not args.get("symmetric", True):
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits,
                                   torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
        out[module_name(name, legacy)] = (q, scale, zp, args)
    return out


def read_nbits_layers(model_dir: str | Path) -> dict[str, tuple]:
    """{module name: (q (N, K) uint8 in [0, 2^b − 1], scale (N, G) float32, zero_point (N, G)
    uint8, group_size, bits)} for every packed Linear of a checkpoint written by
    `write_checkpoint`, each at its own bits (several in a mixed checkpoint).

    Module names are the Hugging Face ones (`model.language_model.layers.0.self_attn.q_proj`);
    the float weight is `{name}.weight`. Values follow edgevlm.quant.primitives: W = (q − z)·s.
    """
    out = {}
    for name, (q, scale, zp, args) in _packed_layers(model_dir).items():
        offset = 1 << (args["num_bits"] - 1)
        q = q.to(torch.int32) + offset
        zp = (torch.full(scale.shape, offset, dtype=torch.int32) if zp is None
              else zp.to(torch.int32) + offset)
        group = args.get("group_size") or q.shape[1]  # channel strategy: one group per row
        out[name] = (q.to(torch.uint8).numpy(), scale.numpy(), zp.to(torch.uint8).numpy(), group,
                     args["num_bits"])
    return out


def read_int4_layers(model_dir: str | Path) -> dict[str, tuple]:
    """`read_nbits_layers` without the bits, for a checkpoint of one bit width:
    {module name: (q, scale, zero_point, group_size)}."""
    mixed = mixed_bits(model_dir)
    if mixed:
        raise UserError(f"{model_dir} mixes {' and '.join(map(str, mixed))}-bit layers "
                        "(`quantize --layer-bits`); read it with read_nbits_layers")
    return {n: v[:4] for n, v in read_nbits_layers(model_dir).items()}


def read_int8_layers(model_dir: str | Path) -> dict[str, tuple]:
    """{module name: (q (N, K) int8, scale (N,) float32, zero_point (N,) int8)} for every packed
    Linear of an 8-bit per-channel checkpoint: compressed-tensors' signed integers as they are,
    W = (q − z)·s per output row (z = 0 when symmetric), the layout of onnxruntime's int8
    weights. Names as in `read_int4_layers`."""
    layers = _packed_layers(model_dir)
    for args in {str(a): a for *_, a in layers.values()}.values():
        if args["num_bits"] != 8 or args.get("strategy") != "channel":
            raise UserError(f"{model_dir} holds {args['num_bits']}-bit weights with strategy "
                            f"{args.get('strategy')!r}; int8 needs 8 bits per channel "
                            "(`edgevlm quantize --bits 8 --group-size -1`)")
    out = {}
    for name, (q, scale, zp, _) in layers.items():
        scale = scale.reshape(-1)  # (N, 1) -> (N,)
        zp = torch.zeros(scale.shape, dtype=torch.int8) if zp is None else zp.reshape(-1)
        out[name] = (q.to(torch.int8).numpy(), scale.numpy(), zp.to(torch.int8).numpy())
    return out
