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

Profiles (edgevlm.json "profile"): "default" and "gpu" use the graphs above; "mobile" fixes
every shape (batch 1, image S x S, K tokens per decoder pass, a cache of C slots) and feeds what
the default decoder computes inside (mobile_decoder_io):
  inputs_embeds [1,K,D], attention_mask [1,1,K,C+K] (additive float: 0 keeps, MASK_VALUE hides),
  rope_cos|rope_sin [1,K,hd] (rows of ROPE_FILE at the K positions),
  past_key_values.{i}.key|value [1,kv,C,hd] (slot p holds position p; unfilled slots masked)
  -> logits [1,K,V], present.{i}.key|value [1,kv,K,hd] (the K new entries, for the caller to
  write into its cache at their positions).
Torch-free: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 2  # 2: the "profile" key and the mobile graphs; 1 (no profile) still reads
PROFILES = ("default", "mobile", "gpu")
ROPE_FILE = "onnx/rope_cos_sin.npy"  # mobile: float32 (2, C, hd), cos then sin per position
MASK_VALUE = -65504.0  # mobile attention_mask for hidden slots: finite in float16 too
MANIFEST = "edgevlm.json"
ONNX_DIR = "onnx"
COMPONENTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "int4": "_q4"}
PRECISIONS = tuple(SUFFIXES)

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


def graph_file(component: str, precision: str) -> str:
    """Relative path of a component's graph at a precision, e.g. onnx/embed_tokens_fp16.onnx."""
    assert component in COMPONENTS, f"unknown component {component}"
    assert precision in SUFFIXES, f"unknown precision {precision}"
    return f"{ONNX_DIR}/{component}{SUFFIXES[precision]}.onnx"


def vision_io() -> GraphIO:
    return GraphIO(inputs={"pixel_values": ("batch", 3, "height", "width")},
                   outputs={"image_features": ("batch", "image_tokens", "hidden")})


def embed_io() -> GraphIO:
    return GraphIO(inputs={"input_ids": ("batch", "sequence")},
                   outputs={"inputs_embeds": ("batch", "sequence", "hidden")})


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_io(num_layers: int) -> GraphIO:
    past = {n: ("batch", "kv_heads", "past_sequence", "head_dim") for n in past_names(num_layers)}
    present = {n: ("batch", "kv_heads", "total_sequence", "head_dim")
               for n in present_names(num_layers)}
    return GraphIO(
        inputs={"inputs_embeds": ("batch", "sequence", "hidden"),
                "attention_mask": ("batch", "total_sequence"),
                "position_ids": ("batch", "sequence"), **past},
        outputs={"logits": ("batch", "sequence", "vocab"), **present})


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


def graph_io(component: str, num_layers: int, profile: str = "default") -> GraphIO:
    """The declared IO of one component (the decoder's depends on its layer count). The mobile
    profile's vision and embedding graphs have the default names with every axis fixed."""
    assert component in COMPONENTS, f"unknown component {component}"
    assert profile in PROFILES, f"unknown profile {profile}"
    if component == "vision_encoder":
        return vision_io()
    if component == "embed_tokens":
        return embed_io()
    return mobile_decoder_io(num_layers) if profile == "mobile" else decoder_io(num_layers)


# Every graph takes and returns float32 tensors (int64 for ids, mask and positions) at every
# precision: fp16 graphs cast inside, so a caller never needs to know a component's precision.
IO_FLOAT_DTYPE = "float32"
