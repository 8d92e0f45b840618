"""onnxruntime-genai with images: the files its `qwen2_5_vl` pipeline reads, beside a Qwen2-VL
export's own graphs and sharing their weights.

genai (0.18) runs Qwen2-VL images through its qwen2_5_vl pipeline (it has no qwen2_vl type; the
decoder and its M-RoPE recipe are the same): an onnxruntime-extensions image processor, then
three sessions, vision (`pixel_values`, `image_grid_thw` -> `image_features`), embedding
(`input_ids`, `image_features` -> the merged `inputs_embeds`) and the decoder, whose M-RoPE
positions genai computes from `image_grid_thw` as edgevlm.runtime.mrope does. The export's
graphs take the same tensors under other names or in other places, so genai gets:

- `onnx/genai_vision{sfx}.onnx`: the vision graph with its grid input renamed `image_grid_thw`
  (the export's is `grid_thw`, the name transformers.js feeds: contract.PATCH_GRID_INPUTS);
- `onnx/genai_embedding{sfx}.onnx`: embed_tokens plus the merge the runtime does in numpy,
      input_ids (B, S) ─► embed_tokens ─► (B, S, D) ─┐
      Equal(input_ids, image_token_id) ─► NonZero ─► Transpose ─► ScatterND ◄─ image_features (N, D)
  which is the runtime's merge exactly: image features in prompt order at the image tokens;
- `genai_processor_config.json`: the image recipe (smart resize to multiples of patch x merge
  between min and max pixels, rescale, normalize, patches); `processor_config.json` stays the
  Hugging Face file that transformers and transformers.js read;
- `genai_config.json` of type qwen2_5_vl over `decoder_model_merged{sfx}.onnx` as it is (its IO
  is genai's: inputs_embeds, attention_mask, position_ids (3, B, S), shared KV buffers).

The two graphs are small: their weights stay where the export's graphs keep them. An external
tensor keeps its reference to `<graph>.onnx_data`; a tensor held inside the source .onnx file
becomes an external reference to its own bytes there (the file offset of its `raw_data`, read
from the protobuf wire format), so no weight is on disk twice.

Qwen2.5-VL is not written: its windowed vision graph takes `window_index` and
`cu_window_seqlens`, which genai 0.18 does not feed, so its genai_config.json stays text-only
(qwen2_5_vl_text), with the reason in edgevlm.json.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgevlm.runtime import contract
from edgevlm.runtime.paths import read_varint

GENAI_TYPE = "qwen2_5_vl"
PROCESSOR_CONFIG = "genai_processor_config.json"  # processor_config.json is Hugging Face's
GRID = "image_grid_thw"  # the grid input genai feeds, whatever its config names
INLINE_BYTES = 1024  # smaller tensors stay in the new graph: a reference costs about as much
RESAMPLE = {0: "NEAREST", 2: "LINEAR", 3: "CUBIC"}  # PIL's modes as the extensions' Resize
WINDOWED_REASON = ("its windowed vision graph takes window_index and cu_window_seqlens, which "
                   "onnxruntime-genai 0.18 does not feed; genai_config.json runs the text "
                   "decoder only (qwen2_5_vl_text), images run in edgevlm.runtime")


def genai_file(kind: str, precision: str) -> str:
    """onnx/genai_vision{sfx}.onnx or onnx/genai_embedding{sfx}.onnx."""
    return f"{contract.ONNX_DIR}/genai_{kind}{contract.SUFFIXES[precision]}.onnx"


def unsupported(info: dict) -> str | None:
    """Why genai cannot take this export's images (`info`: the edgevlm.json dict), or None."""
    vision = info["io"]["vision_encoder"]["inputs"]
    if "window_index" in vision:
        return WINDOWED_REASON
    if set(vision) != {"pixel_values", contract.PATCH_GRID_INPUTS["full"]} or \
            len(info["io"]["decoder_model_merged"]["inputs"].get("position_ids", ())) != 3:
        return (f"onnxruntime-genai has no image pipeline for {info['family']} models; "
                "genai_config.json runs the text decoder only, images run in edgevlm.runtime")
    resample = info["image_processor"].get("resample", 3)
    if resample not in RESAMPLE:
        return (f"its image processor resamples with PIL mode {resample}, which "
                "onnxruntime-extensions' Resize lacks (it has nearest, bilinear and bicubic); "
                "genai_config.json runs the text decoder only")
    return None


# -- the weights where they lie -------------------------------------------------------------

def _fields(buf, start: int, end: int):
    """(field number, first byte, end) of every length-delimited field of one message."""
    i = start
    while i < end:
        key, i = read_varint(buf, i)
        kind = key & 7
        if kind == 0:
            _, i = read_varint(buf, i)
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            assert kind == 2, f"protobuf wire type {kind} (groups) is not in ONNX files"
            n, i = read_varint(buf, i)
            yield key >> 3, i, i + n
            i += n


def raw_data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """{initializer name: (offset, length) of its raw_data in the .onnx file at `path`}, read
    from the wire format (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name =
    8, TensorProto.raw_data = 9) without loading the tensors."""
    spans = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, g0, g1 in _fields(buf, 0, len(buf)):
            if field != 7:
                continue
            for field, t0, t1 in _fields(buf, g0, g1):
                if field != 5:
                    continue
                name, raw = None, None
                for f2, a, b in _fields(buf, t0, t1):
                    if f2 == 8:
                        name = bytes(buf[a:b]).decode()
                    elif f2 == 9:
                        raw = (a, b - a)
                if name is not None and raw is not None:
                    spans[name] = raw
    return spans


def _point_at_source(model: onnx.ModelProto, source: Path) -> None:
    """Every inline initializer of `model` (a copy of the graph at `source`, both in the same
    folder) of INLINE_BYTES or more becomes a reference to its bytes inside `source`."""
    spans = raw_data_spans(source)
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) < INLINE_BYTES:
            continue
        offset, length = spans[tensor.name]
        assert length == len(tensor.raw_data), f"{source}: {tensor.name} is not where it was read"
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", source.name), ("offset", str(offset)),
                           ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


# -- the two graphs -------------------------------------------------------------------------

def _rename_input(graph, old: str, new: str) -> None:
    for value in graph.input:
        if value.name == old:
            value.name = new
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _merge_images(graph, image_token_id: int, hidden: int) -> None:
    """embed_tokens' graph -> genai's embedding: the image features replace the embeddings at
    the image tokens, in prompt order."""
    out = graph.output[0].name  # inputs_embeds
    for node in graph.node:
        for k, name in enumerate(node.output):
            if name == out:
                node.output[k] = "text_embeds"
    graph.input.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT,
                                                     ["num_image_tokens", hidden]))
    graph.initializer.append(helper.make_tensor("image_token_id", TensorProto.INT64, [],
                                                [image_token_id]))
    graph.node.extend([
        helper.make_node("Equal", ["input_ids", "image_token_id"], ["is_image"],
                         name="/genai/Equal"),
        helper.make_node("NonZero", ["is_image"], ["image_positions"], name="/genai/NonZero"),
        helper.make_node("Transpose", ["image_positions"], ["image_indices"], perm=[1, 0],
                         name="/genai/Transpose"),  # (N, 2): (batch, position) per image token
        helper.make_node("ScatterND", ["text_embeds", "image_indices", "image_features"], [out],
                         name="/genai/ScatterND"),
    ])


def _derive(source: Path, target: Path, edit) -> int:
    """Write `target`, the graph at `source` changed by `edit(graph)`, reading its weights from
    where `source` keeps them; returns the bytes written."""
    model = onnx.load(str(source), load_external_data=False)
    edit(model.graph)
    _point_at_source(model, source)
    onnx.save_model(model, str(target))
    return target.stat().st_size


# -- the configs ----------------------------------------------------------------------------

def processor_config(ip: dict) -> dict:
    """The onnxruntime-extensions pipeline equal to the export's image processor (`ip`: its
    edgevlm.json settings): Qwen2VLImageProcessor's smart resize, rescale, normalize and
    patches. Resize's width and height are placeholders that smart_resize replaces."""
    assert ip.get("resample", 3) in RESAMPLE, "unsupported() refuses other resample modes"

    def step(name: str, kind: str, **attrs) -> dict:
        return {"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}

    size, patch, merge = ip["size"], ip["patch_size"], ip["merge_size"]
    return {"processor": {"name": "qwen2_5_image_processor", "transforms": [
        step("decode_image", "DecodeImage", color_space="RGB"),
        step("convert_to_rgb", "ConvertRGB"),
        step("resize", "Resize", width=540, height=360, smart_resize=1,
             min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
             patch_size=patch, merge_size=merge, interpolation=RESAMPLE[ip.get("resample", 3)]),
        step("rescale", "Rescale", rescale_factor=ip["rescale_factor"]),
        step("normalize", "Normalize", mean=ip["image_mean"], std=ip["image_std"],
             qwen2_5_vl=1),
        step("patch_image", "PatchImage", patch_size=patch,
             temporal_patch_size=ip["temporal_patch_size"], merge_size=merge),
    ]}}


def config(text: dict, model_config: dict, info: dict, graphs: dict[str, str]) -> dict:
    """genai_config.json for the pipeline, from the text-only one `text` (builder.genai.config)
    and the model's config.json; `graphs`: {"vision", "embedding", "decoder": file}."""
    model = dict(text["model"])
    decoder = dict(model["decoder"])
    options = decoder["session_options"]
    decoder["filename"] = graphs["decoder"]
    decoder["inputs"] = {"inputs_embeds": "inputs_embeds",
                         **{k: v for k, v in decoder["inputs"].items() if k != "input_ids"}}
    ip = info["image_processor"]
    model.update(
        type=GENAI_TYPE, decoder=decoder,
        image_token_id=info["image_token_id"],
        video_token_id=model_config["video_token_id"],
        vision_start_token_id=model_config["vision_start_token_id"],
        embedding={"filename": graphs["embedding"], "session_options": options,
                   "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                   "outputs": {"inputs_embeds": "inputs_embeds"}},
        vision={"filename": graphs["vision"], "config_filename": PROCESSOR_CONFIG,
                "session_options": options, "spatial_merge_size": ip["merge_size"],
                "patch_size": ip["patch_size"], "tokens_per_second": 2.0,
                "inputs": {"pixel_values": "pixel_values", GRID: GRID},
                "outputs": {"image_features": "image_features"}})
    return {**text, "model": model}


@dataclass(frozen=True)
class GenaiImages:
    """edgevlm.json "decoder.genai": what genai runs and, where it takes no images, why."""

    type: str
    images: bool
    reason: str | None = None
    files: tuple[str, ...] = ()  # the files written for genai's image pipeline
    bytes: int = 0  # their size on disk: graphs and configs, no weights

    def to_dict(self) -> dict:
        return {"type": self.type, "images": self.images, "reason": self.reason,
                "files": list(self.files), "bytes": self.bytes}


def write(out: Path, info: dict, graphs: dict[str, tuple[str, str]]) -> GenaiImages:
    """The image pipeline's files in the export folder `out`, whose text-only genai_config.json,
    graphs (`graphs`: {component: (file, precision)}) and config.json are written; returns the
    manifest entry. Exports genai cannot take images from keep their text-only config."""
    path = out / contract.GENAI_CONFIG
    text = json.loads(path.read_text())
    reason = unsupported(info)
    if reason is not None:
        return GenaiImages(text["model"]["type"], False, reason)
    vision_file, vision_precision = graphs["vision_encoder"]
    embed_file, embed_precision = graphs["embed_tokens"]
    files = {"vision": genai_file("vision", vision_precision),
             "embedding": genai_file("embedding", embed_precision),
             "decoder": graphs["decoder_model_merged"][0]}
    grid = contract.PATCH_GRID_INPUTS["full"]
    size = _derive(out / vision_file, out / files["vision"],
                   lambda g: _rename_input(g, grid, GRID))
    size += _derive(out / embed_file, out / files["embedding"],
                    lambda g: _merge_images(g, info["image_token_id"], info["hidden_size"]))
    model_config = json.loads((out / "config.json").read_text())
    (out / PROCESSOR_CONFIG).write_text(
        json.dumps(processor_config(info["image_processor"]), indent=1) + "\n")
    path.write_text(json.dumps(config(text, model_config, info, files), indent=1) + "\n")
    size += (out / PROCESSOR_CONFIG).stat().st_size
    return GenaiImages(GENAI_TYPE, True, None,
                       (files["vision"], files["embedding"], PROCESSOR_CONFIG), size)
