"""`ExportConfig`: what `edgevlm export` is asked for, checked as it is made, and the defaults
each profile (default, mobile, gpu) picks when a field is left out."""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UserError
from edgevlm.export import int4
from edgevlm.runtime import contract, token_select
from edgevlm.runtime.contract import DecoderKind, Precision, Profile

# Component precisions each profile picks when none is given (decoder, vision, embedding).
# gpu: fp16 for the compute-bound vision tower, MatMulNBits int4 for the memory-bound decoder;
# the fp16 graphs keep RoPE, RMSNorm statistics and softmax in float32 as torch computes them.
PROFILE_PRECISIONS = {Profile.DEFAULT: ("fp32", None, None), Profile.MOBILE: ("fp16", None, None),
                      Profile.GPU: ("int4", "fp16", "fp16")}
MOBILE_PRECISIONS = ("fp16",)  # what NNAPI and CoreML run without CPU fallback for the math
# The decoder each profile writes when --decoder is not given (edgevlm.export.decoder): built from
# the weights with onnxruntime's fused ops, except on mobile, whose static graphs are traced.
PROFILE_DECODERS = {Profile.DEFAULT: DecoderKind.BUILDER, Profile.MOBILE: DecoderKind.TRACED,
                    Profile.GPU: DecoderKind.BUILDER}
# The vision encoder of a `--precision int4` export when --vision-precision is not given: int8
# (MatMulInteger) ran the SigLIP-224 tower of the SmolLM2 LLaVA in 4.2 ms against 12.1 ms as
# int4 MatMulNBits on an AVX2 CPU with int8 weights (benchmarks/results/runtime_speed.json,
# "vision"), and rounds less. Its weights are now stored as uint8, which onnxruntime computes
# exactly on every CPU but without VNNI's fast path (2.0x the time of int8 weights on an
# AVX-512 VNNI CPU, benchmarks/results/int8_weights.json). Kept in fp32 instead when int8 costs
# more than its budget (edgevlm.export.vision_int8). A checkpoint that quantized its vision
# layers to 4 bits keeps them (its own integers).
INT4_VISION = Precision.INT8


@dataclass(frozen=True)
class ExportConfig:
    # Strings from the CLI or JSON become their enums here, once (Precision, Profile,
    # DecoderKind); the exporter reads only the enums.
    precision: Precision | None = None  # decoder, and the default for the other components;
    # None: the profile's (PROFILE_PRECISIONS)
    vision_precision: Precision | None = None  # None: the profile's, else same as `precision`
    embed_precision: Precision | None = None  # None: the profile's, else same as `precision`
    block_size: int | None = None  # int4: input channels per scale / zero point; None: the
    # quantized checkpoint's group size, else DEFAULT_BLOCK
    opset: int = 17
    validate: bool = True
    overwrite: bool = False
    external_data: bool | None = None  # None: weights in <graph>.onnx_data above 1 GB
    new_tokens: int = 32  # greedy tokens compared with torch when validating
    profile: Profile = Profile.DEFAULT  # default | mobile (static shapes, NPU ops) | gpu
    max_context: int | None = None  # mobile: cache slots; None: min(model limit, 1024)
    readiness: bool = True  # mobile: measure NNAPI/CoreML coverage (and the ORT-format files)
    decoder: DecoderKind | None = None  # None: the profile's (PROFILE_DECODERS), which
    # falls back to traced for a text model the builder does not cover
    accuracy_level: int | None = None  # builder int4/int8: MatMulNBits accuracy_level; None:
    # the profile's (edgevlm.export.builder.linear.ACCURACY_LEVELS)
    visual_tokens: int | None = None  # image tokens the decoder sees (runtime.token_select)
    token_select: str | None = None  # divprune | visionzip, with visual_tokens
    image_splitting: bool | None = None  # a tiled family's recipe: split images into tiles;
    # None: the model's processor's setting
    min_pixels: int | None = None  # a patch family's (Qwen2-VL) resize bounds, in pixels;
    max_pixels: int | None = None  # None: the model's processor's

    def __post_init__(self):
        if self.profile not in contract.PROFILES:
            raise UserError(f"--profile {self.profile!r} is unknown; choose one of "
                            f"{', '.join(contract.PROFILES)}")
        object.__setattr__(self, "profile", Profile(self.profile))
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
            if self.profile is Profile.MOBILE and value is not None \
                    and value not in MOBILE_PRECISIONS:
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
        if self.decoder is not None:
            object.__setattr__(self, "decoder", DecoderKind(self.decoder))
        if self.decoder is DecoderKind.BUILDER and self.profile is Profile.MOBILE:
            raise UserError("--decoder builder is not available with --profile mobile (its "
                            "static graphs are traced); drop --decoder")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"--accuracy-level {self.accuracy_level} is not one of MatMulNBits' "
                            "0 (float compute), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
        if self.max_context is not None and self.profile is not Profile.MOBILE \
                and self.decoder_kind is not DecoderKind.BUILDER:
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
        if self.token_select == "visionzip" and self.profile is Profile.MOBILE:
            raise UserError("--token-select visionzip needs the default profile's vision graph "
                            "(it adds an attention output); use divprune with --profile mobile")

    @property
    def decoder_kind(self) -> DecoderKind:
        """The decoder asked for, with the profile's default resolved."""
        return self.decoder or PROFILE_DECODERS[self.profile]

    def precisions(self) -> dict[str, Precision]:
        return {"vision_encoder": self.vision_precision or self.precision,
                "embed_tokens": self.embed_precision or self.precision,
                "decoder_model_merged": self.precision}
