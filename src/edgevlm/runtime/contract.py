"""The export artifact contract, written once: file names, graph IO names and axes, manifest.

The exporter (edgevlm.export) writes graphs by these declarations and the runtime
(edgevlm.runtime) feeds them by the same ones, so the two cannot drift. The layout follows the
transformers.js / SmolVLM ONNX releases:
  onnx/vision_encoder{sfx}.onnx   pixel_values [B,3,H,W]            -> image_features [B,N,D]
  onnx/embed_tokens{sfx}.onnx     input_ids [B,S]                   -> inputs_embeds [B,S,D]
  onnx/decoder_model_merged{sfx}.onnx
      inputs_embeds [B,S,D], attention_mask [B,P+S], position_ids [B,S],
      past_key_values.{i}.key|value [B,kv,P,hd]  -> logits [B,S,V], present.{i}.key|value
  edgevlm.json                    the manifest below
The first decoder step passes a past of length P=0, so one graph serves prefill and decode.
Dynamic axes carry the names transformers.js and HF's ONNX releases use (batch_size,
sequence_length, past_sequence_length, total_sequence_length): transformers.js sizes its empty
first past from them, and reads an axis it does not know as 0. Exports before that used batch,
sequence, ...; the runtime checks only IO names, so they still load.

Profiles (edgevlm.json "profile"): "default" and "gpu" use the graphs above; "mobile" fixes
every shape (batch 1, image S x S, K tokens per decoder pass, a cache of C slots) and feeds what
the default decoder computes inside (mobile_decoder_io):
  inputs_embeds [1,K,D], attention_mask [1,1,K,C+K] (additive float: 0 keeps, MASK_VALUE hides),
  rope_cos|rope_sin [1,K,hd] (rows of ROPE_FILE at the K positions),
  past_key_values.{i}.key|value [1,kv,C,hd] (slot p holds position p; unfilled slots masked)
  -> logits [1,K,V], present.{i}.key|value [1,kv,K,hd] (the K new entries, for the caller to
  write into its cache at their positions).
Decoder kinds (edgevlm.json "decoder.kind"): "traced" is the decoder above (torch.onnx over
transformers' modules). "builder" (edgevlm.export.builder, format version 3) is written from the
weights with onnxruntime's contrib ops, in onnxruntime-genai's IO (builder_decoder_io):
  inputs_embeds [B,S,D], attention_mask [B,P+S] (ones; its row sums and width give
  GroupQueryAttention's seqlens_k = P+S-1 [B] int32 and total_sequence_length = P+S int32,
  computed inside the graph, so genai can feed the same graph), no position_ids (rotary inside
  GroupQueryAttention, at positions P..P+S-1),
  past_key_values.{i}.key|value [B,kv,L,hd]: KV buffers of L = decoder.max_context positions
  -> logits [B,1,V] (last position only), present.{i}.key|value [B,kv,L,hd].
  The caller binds each present to the OrtValue of its past (IOBinding), so the step writes its
  S new entries into the buffer at P.. and nothing is copied; P+S may not exceed L. The KV
  dtype is the graph's (float16 in fp16-activation graphs), read from the session.
Torch-free: standard library only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FORMAT_VERSION = 3  # 3: the "decoder" key and builder decoders; 2: the "profile" key and the
# mobile graphs; 1 (no profile). Older versions still read (as traced decoders).
ROPE_FILE = "onnx/rope_cos_sin.npy"  # mobile: float32 (2, C, hd), cos then sin per position
MASK_VALUE = -65504.0  # mobile attention_mask for hidden slots: finite in float16 too
MANIFEST = "edgevlm.json"
GENAI_CONFIG = "genai_config.json"  # onnxruntime-genai's config, beside a builder decoder
ONNX_DIR = "onnx"
COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "int4": "_q4"}
PRECISIONS = tuple(SUFFIXES)


class Precision(str, enum.Enum):
    """A graph's precision: the one notion the exporter and runtime share. A str, so it equals,
    hashes and serializes as its name ("int4")."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # MatMulInteger / dynamic int8 activations, or MatMulNBits 8-bit
    INT4 = "int4"  # MatMulNBits

    def __str__(self) -> str:
        return self.value

    @property
    def suffix(self) -> str:
        """The graph file's suffix (transformers.js names: "", _fp16, _int8, _q4)."""
        return SUFFIXES[self.value]

    @property
    def quantized(self) -> bool:
        """Integer weights: made by quantizing a float graph (or carried from a checkpoint)."""
        return self in (Precision.INT8, Precision.INT4)

    @property
    def floating(self) -> bool:
        """Float weights: traced as they are."""
        return not self.quantized

    @property
    def half(self) -> bool:
        return self is Precision.FP16



class Profile(str, enum.Enum):
    """What an export is made for (edgevlm.json "profile"): the default graphs, the mobile
    profile's static NPU graphs, or the gpu profile's fp16/int4 mix."""

    DEFAULT = "default"
    MOBILE = "mobile"
    GPU = "gpu"

    def __str__(self) -> str:
        return self.value


class DecoderKind(str, enum.Enum):
    """How the decoder graph was made (edgevlm.json "decoder.kind"): traced from transformers'
    modules, or built from the weights with onnxruntime's fused ops."""

    TRACED = "traced"
    BUILDER = "builder"

    def __str__(self) -> str:
        return self.value


class Activations(str, enum.Enum):
    """The float type inside a built decoder graph and of its KV buffers."""

    FP32 = "fp32"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value


PROFILES = tuple(p.value for p in Profile)
DECODER_KINDS = tuple(k.value for k in DecoderKind)


Axes = tuple  # each entry: a symbolic axis name (dynamic) or an int (static)


@dataclass(frozen=True)
class GraphIO:
    """Names and axes of one graph's inputs and outputs, in order."""

    inputs: dict[str, Axes]
    outputs: dict[str, Axes]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes form: {name: {axis_index: axis_name}}."""
        return {name: {i: a for i, a in enumerate(axes) if isinstance(a, str)}
                for name, axes in {**self.inputs, **self.outputs}.items()}

    def to_dict(self) -> dict:
        """JSON form for the manifest: {"inputs": {name: [axes]}, "outputs": {...}}."""
        return {"inputs": {n: list(a) for n, a in self.inputs.items()},
                "outputs": {n: list(a) for n, a in self.outputs.items()}}


def graph_file(component: str, precision: Precision) -> str:
    """Relative path of a component's graph at a precision, e.g. onnx/embed_tokens_fp16.onnx."""
    assert component in COMPONENTS, f"unknown component {component}"
    assert precision in SUFFIXES, f"unknown precision {precision}"
    return f"{ONNX_DIR}/{component}{SUFFIXES[precision]}.onnx"


def genai_graph_file(precision: Precision) -> str:
    """The text-only graph onnxruntime-genai runs (input_ids in; edgevlm.export.builder.genai),
    beside the builder decoder whose weights file it shares."""
    assert precision in SUFFIXES, f"unknown precision {precision}"
    return f"{ONNX_DIR}/genai_decoder{SUFFIXES[precision]}.onnx"


# The grid input of each patch vision graph, named as transformers.js feeds it:
# Qwen2VLForConditionalGeneration passes `grid_thw`, Qwen2_5_VLForConditionalGeneration
# `image_grid_thw` (tests/runtime/test_transformers_js_qwen2_vl.py). onnxruntime-genai feeds
# `image_grid_thw` only (docs/families.md, "Qwen2-VL in other runtimes").
PATCH_GRID_INPUTS = {"full": "grid_thw", "windowed": "image_grid_thw"}


def vision_io(tiled: bool = False, scores: bool = False, patches: str | None = None) -> GraphIO:
    """One image per row (LLaVA); `tiled` (Idefics3 / SmolVLM, transformers.js's layout): the
    tiles of each image, with their pixel mask, in; every tile's tokens out. `scores`: a LLaVA
    graph also gives each image token's attention score, for `--token-select visionzip`.
    `patches` (Qwen2-VL): one image at its own resolution as flat patches and its (t, h, w)
    grid (PATCH_GRID_INPUTS names it), "windowed" (Qwen2.5-VL) with the window order and bounds
    the runtime computes."""
    if patches is not None:
        inputs = {"pixel_values": ("num_patches", "patch_dim"), PATCH_GRID_INPUTS[patches]: (1, 3)}
        if patches == "windowed":
            inputs.update(window_index=("image_tokens",), cu_window_seqlens=("windows_plus_1",))
        return GraphIO(inputs=inputs, outputs={"image_features": ("image_tokens", "hidden")})
    if tiled:
        return GraphIO(inputs={"pixel_values": ("batch_size", "num_images", 3, "height", "width"),
                               "pixel_attention_mask": ("batch_size", "num_images", "height",
                                                        "width")},
                       outputs={"image_features": ("num_tiles", "image_tokens", "hidden")})
    outputs = {"image_features": ("batch_size", "image_tokens", "hidden")}
    if scores:
        outputs["visual_scores"] = ("batch_size", "image_tokens")
    return GraphIO(inputs={"pixel_values": ("batch_size", 3, "height", "width")},
                   outputs=outputs)


def embed_io() -> GraphIO:
    return GraphIO(inputs={"input_ids": ("batch_size", "sequence_length")},
                   outputs={"inputs_embeds": ("batch_size", "sequence_length", "hidden")})


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_io(num_layers: int, mrope: bool = False) -> GraphIO:
    past = {n: ("batch_size", "kv_heads", "past_sequence_length", "head_dim")
            for n in past_names(num_layers)}
    present = {n: ("batch_size", "kv_heads", "total_sequence_length", "head_dim")
               for n in present_names(num_layers)}
    return GraphIO(
        inputs={"inputs_embeds": ("batch_size", "sequence_length", "hidden"),
                "attention_mask": ("batch_size", "total_sequence_length"),
                "position_ids": ((3,) if mrope else ()) + ("batch_size", "sequence_length"),
                **past},
        outputs={"logits": ("batch_size", "sequence_length", "vocab"), **present})


def mobile_decoder_io(num_layers: int) -> GraphIO:
    """The mobile profile's decoder; every axis is fixed at export (see the module docstring)."""
    past = {n: (1, "kv_heads", "context", "head_dim") for n in past_names(num_layers)}
    present = {n: (1, "kv_heads", "step", "head_dim") for n in present_names(num_layers)}
    return GraphIO(
        inputs={"inputs_embeds": (1, "step", "hidden"),
                "attention_mask": (1, 1, "step", "context_plus_step"),
                "rope_cos": (1, "step", "head_dim"), "rope_sin": (1, "step", "head_dim"),
                **past},
        outputs={"logits": (1, "step", "vocab"), **present})


def builder_decoder_io(num_layers: int, mrope: bool = False) -> GraphIO:
    """The builder's decoder (see the module docstring): shared KV buffers, last logits only.
    `mrope` (Qwen2-VL): position_ids [3, B, S], the three M-RoPE streams the runtime computes."""
    kv = ("batch_size", "kv_heads", "max_context", "head_dim")
    positions = ({"position_ids": (3, "batch_size", "sequence_length")} if mrope else {})
    return GraphIO(
        inputs={"inputs_embeds": ("batch_size", "sequence_length", "hidden"),
                "attention_mask": ("batch_size", "total_sequence_length"), **positions,
                **{n: kv for n in past_names(num_layers)}},
        outputs={"logits": ("batch_size", 1, "vocab"),
                 **{n: kv for n in present_names(num_layers)}})


def graph_io(component: str, num_layers: int, profile: Profile = Profile.DEFAULT,
             decoder: DecoderKind = DecoderKind.TRACED, tiled: bool = False,
             scores: bool = False, patches: str | None = None, mrope: bool = False) -> GraphIO:
    """The declared IO of one component (the decoder's depends on its layer count and kind). The
    mobile profile's vision and embedding graphs have the default names with every axis fixed.
    `patches` and `mrope`: Qwen2-VL's vision and decoder graphs (vision_io, decoder_io)."""
    assert component in COMPONENTS, f"unknown component {component}"
    assert profile in PROFILES, f"unknown profile {profile}"
    assert decoder in DECODER_KINDS, f"unknown decoder kind {decoder}"
    if component == "vision_encoder":
        return vision_io(tiled, scores, patches)
    if component == "embed_tokens":
        return embed_io()
    if decoder == DecoderKind.BUILDER:
        return builder_decoder_io(num_layers, mrope)
    if profile == Profile.MOBILE:
        return mobile_decoder_io(num_layers)
    return decoder_io(num_layers, mrope)


# Every graph takes and returns float32 tensors (int64 for ids, mask and positions) at every
# precision: fp16 graphs cast inside, so a caller never needs to know a component's precision.
IO_FLOAT_DTYPE = "float32"
