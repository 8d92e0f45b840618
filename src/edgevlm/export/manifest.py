"""The export folder's non-graph half: model files copied beside the graphs, and edgevlm.json.

edgevlm.json holds everything a torch-free runtime needs that the graphs do not say: cache
sizes, the image token and its count, special token ids, the chat template, how to preprocess
an image, and how the export was made and checked (command, versions, parity).
"""

from __future__ import annotations

import enum
import json
import platform
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from edgevlm.families import family_of
from edgevlm.families.backbones import input_side
from edgevlm.runtime import contract

# The files of a Hugging Face model folder the runtime or other tools read; weights are not
# copied (they are in the graphs).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "processor_config.json", "preprocessor_config.json")

# Image processor settings a runtime needs to reproduce pixel_values.
IMAGE_KEYS = ("image_processor_type", "do_convert_rgb", "do_resize", "size", "resample",
              "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
              "image_mean", "image_std", "do_pad", "max_image_size", "do_image_splitting",
              "patch_size", "temporal_patch_size", "merge_size")


def copy_model_files(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)
    return copied


def write_processor_files(out_dir: Path, info: dict) -> None:
    """Make the copied processor and tokenizer files open as an HF ONNX release does, in
    transformers and in transformers.js alike:

    - preprocessor_config.json names `processor_class` (transformers.js's AutoProcessor reads it
      there, and without it returns an image processor with no tokenizer);
    - tokenizer_config.json carries the chat template (transformers.js's tokenizer reads it only
      there; transformers reads chat_template.jinja, which stays);
    - processor_config.json states the image-token count so both processors expand `<image>` to
      the `num_image_tokens` features the vision encoder gives: transformers counts patches +
      num_additional_image_tokens, minus 1 under strategy "default"; transformers.js never
      subtracts. So the count is written as patches + (num_image_tokens - patches) under
      "full", which both read the same way. That strategy field only counts tokens; the model's
      own selection (config.json's vision_feature_select_strategy, e.g. CLIP's CLS drop) is
      unchanged and already inside the vision encoder graph;
    - a Qwen2-VL config.json also carries its text sizes at the top level (FLAT_TEXT_SIZES),
      where transformers.js reads them; its processor files need nothing else (transformers.js's
      Qwen2VLProcessor expands `<|image_pad|>` by the image's grid as transformers does)."""
    family = family_of(info["model_type"])
    if family.image_layout == "patches":  # Qwen2-VL: its processor files say it all
        _name_processor(out_dir, family.processor_class)
        _flat_text_sizes(out_dir)
        _template_into_tokenizer(out_dir, info)
        return
    if family.image_layout != "fixed":  # its processor files say it all, but the
        # export's own tiling (--[no-]image-splitting) goes where transformers(.js) read it
        _name_processor(out_dir, family.processor_class, {
            "do_image_splitting": info["image_processor"].get("do_image_splitting", True)})
        _template_into_tokenizer(out_dir, info)
        return
    config = json.loads((out_dir / "config.json").read_text())
    vision = config.get("vision_config") or {}
    patch = int(vision.get("patch_size") or 1)
    # the patches of the image the tower sees: DINOv2's processor crop, not its config's grid
    patches = (int(input_side(vision, info["image_processor"]) or 0) // patch) ** 2
    _name_processor(out_dir, family.processor_class)
    proc_path = out_dir / "processor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
    proc.update(processor_class="LlavaProcessor", image_token=info["image_token"],
                patch_size=patch, vision_feature_select_strategy="full",
                # the full count: HF processors know nothing of token selection
                num_additional_image_tokens=info["vision_tokens"] - patches)
    proc_path.write_text(json.dumps(proc, indent=2) + "\n")
    _template_into_tokenizer(out_dir, info)


# The text sizes transformers.js reads from the top level of a qwen2_vl config.json (the Hub's
# Qwen2-VL configs are flat; transformers 5 nests them in text_config): without them it makes no
# past_key_values for the decoder. transformers loads the config alike with or without them.
FLAT_TEXT_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers",
                   "num_key_value_heads")


def _flat_text_sizes(out_dir: Path) -> None:
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config") or {}
    config.update({k: text[k] for k in FLAT_TEXT_SIZES if k in text and k not in config})
    path.write_text(json.dumps(config, indent=2) + "\n")


def _name_processor(out_dir: Path, processor_class: str, settings: dict | None = None) -> None:
    pre_path = out_dir / "preprocessor_config.json"
    if pre_path.is_file():
        pre = json.loads(pre_path.read_text())
        pre["processor_class"] = processor_class
        pre.update(settings or {})
        pre_path.write_text(json.dumps(pre, indent=2) + "\n")


def _template_into_tokenizer(out_dir: Path, info: dict) -> None:
    tok_path = out_dir / "tokenizer_config.json"
    if tok_path.is_file() and info.get("chat_template"):
        tok = json.loads(tok_path.read_text())
        tok["chat_template"] = info["chat_template"]
        tok_path.write_text(json.dumps(tok, indent=2) + "\n")


def _plain(value):
    """JSON-safe copy: enums (PIL resample modes) become ints, tuples lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def image_settings(image_processor) -> dict:
    settings = image_processor.to_dict()
    return {k: _plain(settings[k]) for k in IMAGE_KEYS if settings.get(k) is not None}


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from edgevlm import __version__

    return {"edgevlm": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def build(loaded, dims, config, weight_sources: dict[str, str | None]) -> dict:
    """The manifest dict. `weight_sources` ({"int4_source", "int8_source"}) says where each
    integer precision's weights came from; the exporter fills in "components" (name -> {"file",
    "precision", "bytes", "external_data"}) and "parity" once the graphs are written and
    checked."""
    model, proc = loaded.model, loaded.processor
    family = family_of(model)
    tok = proc.tokenizer
    tc = model.config.text_config
    gen = model.generation_config
    return {
        "format_version": contract.FORMAT_VERSION,
        "profile": config.profile,
        "model_type": model.config.model_type,
        "text_model_type": tc.model_type,
        "vision_model_type": model.config.vision_config.model_type,
        # the side of the images the vision graph takes: DINOv2's is its processor's crop, not
        # its config's image_size (the position grid it interpolates from)
        "vision_image_size": input_side(model.config.vision_config, proc.image_processor),
        "components": None,
        "family": family.name,
        "io": {c: contract.graph_io(c, dims.num_layers, config.profile,
                                    scores=config.token_select == "visionzip",
                                    **family.graph_options(model.config)).to_dict()
               for c in contract.COMPONENTS},
        "io_float_dtype": contract.IO_FLOAT_DTYPE,
        "num_layers": dims.num_layers,
        "num_kv_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "hidden_size": dims.hidden_size,
        "vocab_size": dims.vocab_size,
        "max_position_embeddings": tc.max_position_embeddings,
        "image_token_id": loaded.image_token_id,
        "image_token": tok.convert_ids_to_tokens(loaded.image_token_id),
        # what the decoder sees per image; the vision graph gives vision_tokens, of which
        # token_select keeps num_image_tokens (runtime.token_select)
        "num_image_tokens": config.visual_tokens or loaded.num_image_tokens,
        "vision_tokens": loaded.num_image_tokens,
        "token_select": ({"method": config.token_select, "tokens": config.visual_tokens}
                         if config.token_select else None),
        "eos_token_id": gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id,
        "pad_token_id": gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "chat_template": getattr(proc, "chat_template", None) or tok.chat_template,
        "image_processor": image_settings(proc.image_processor),
        **weight_sources,
        "config": asdict(config),
        "command": shlex.join(sys.argv),
        "versions": versions(),
        "parity": None,
    }
