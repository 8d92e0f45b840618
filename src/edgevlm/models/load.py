"""Load and save model directories of every family edgevlm knows (edgevlm.families: LLaVA,
Idefics3/SmolVLM). A model is a plain Hugging Face directory, so the same code loads our tiny
presets and a real checkpoint such as llava-hf/llava-interleave-qwen-0.5b-hf."""

from __future__ import annotations

import json
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.families import LoadedModel, family_of, supported_model_types
from edgevlm.models import token_reduce
from edgevlm.models.sizes import check_sizes

SUPPORTED_MODEL_TYPES = supported_model_types()


def num_image_tokens(config, image_processor=None) -> int:
    """Image tokens per image, as the family's processor expands `<image>`; `image_processor`:
    the model's own, where the size it makes sets the count (a LLaVA DINOv2 tower)."""
    family = family_of(config)
    return (family.num_image_tokens(config) if image_processor is None
            else family.num_image_tokens(config, image_processor))


def read_config(model_dir: str | Path) -> dict:
    """config.json of a model directory, checked to be LLaVA-family."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} is not a model directory (no config.json); give a folder "
                        "made by `edgevlm init`/`train` or a Hugging Face LLaVA checkpoint")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config "
                        "fields; copy the model's original config.json")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{model_dir}: model_type {cfg.get('model_type')!r} is not a model "
                        f"family edgevlm knows; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_sizes(cfg, str(path))
    return cfg


def load_model(model_dir: str | Path, dtype=None, device: str | None = None,
               dequantize: bool = False, reduce_tokens: bool = True) -> LoadedModel:
    """Load a LLaVA-family checkpoint directory and its processor. `dequantize`: a
    compressed-tensors checkpoint comes back as plain Linears holding (q − z)·s exactly."""
    import torch
    import transformers
    from transformers import AutoProcessor

    from edgevlm.quant.checkpoint import decompress, mixed_bits

    cfg = read_config(model_dir)
    model_class = getattr(transformers, family_of(cfg).model_class)
    _check_weight_format(Path(model_dir))
    kw = {}
    # transformers' dequantize-on-load reads every layer with one config group's bits; a mixed
    # checkpoint (symmetric, QuantConfig.layer_bits) loads plainly and is decompressed after
    mixed = dequantize and bool(mixed_bits(model_dir))
    if dequantize and not mixed:
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    config = _read_hf_config(model_dir)
    try:
        model, info = model_class.from_pretrained(str(model_dir), config=config,
                                                  dtype=dtype or torch.float32,
                                                  output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 -- only the weight files' own errors are renamed
        if type(e).__name__ == "SafetensorError":
            raise UserError(f"{model_dir}: a weights file is damaged or truncated ({e}); copy "
                            "or download the model again") from e
        if isinstance(e, OSError) and "no file named" in str(e):
            raise UserError(f"{model_dir} has no weights (no model.safetensors); copy the "
                            "whole model folder, or make one with `edgevlm init`") from e
        raise
    _check_covered(model_dir, info)
    if mixed:
        decompress(model)
    if device:
        model = model.to(device)
    model.eval()
    family = family_of(model)
    try:
        processor = (family.load_processor or AutoProcessor.from_pretrained)(str(model_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: could not load the processor ({e}); the folder needs "
                        "tokenizer and preprocessor_config.json files") from e
    image_token_id = getattr(model.config, family.image_token_key)
    tokens = (family.max_image_tokens(processor) if family.max_image_tokens
              else num_image_tokens(model.config, processor.image_processor))
    loaded = LoadedModel(model, processor, image_token_id, tokens)
    reduced = token_reduce.setting(model.config)
    if reduced and reduce_tokens:  # trained at a reduced visual token count: keep seeing it
        loaded = token_reduce.install(loaded, reduced["method"], reduced["tokens"])
    return loaded


def _read_hf_config(model_dir):
    """config.json as transformers reads it, its own consistency checks (layer_types against
    num_hidden_layers, rope parameters, ...) failing in one line."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        cause = e.__cause__ or e
        raise UserError(f"{Path(model_dir) / 'config.json'} is inconsistent ({cause}); fix "
                        "that field, or copy the model's original config.json") from e


def _check_weight_format(model_dir: Path) -> None:
    """Only safetensors weights load: a pickle checkpoint (pytorch_model.bin) runs code as it
    unpickles."""
    if not any(model_dir.glob("*.safetensors")) and any(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir} holds pickle-format weights (*.bin), which edgevlm does "
                        "not load: unpickling can run code. Convert them to safetensors first "
                        "(transformers: load the model and save_pretrained it, which writes "
                        "model.safetensors)")


def _check_covered(model_dir, info: dict) -> None:
    """Refuse a checkpoint whose weights do not cover its config: transformers would fill the
    missing tensors with random values and every result would be silently wrong. A packed
    layer (compressed-tensors, decompressed after loading) covers its `weight`."""
    packed = {k.rsplit(".", 1)[0] for k in info.get("unexpected_keys", ())
              if k.endswith(".weight_packed")}
    missing = sorted(k for k in info.get("missing_keys", ())
                     if not (k.endswith(".weight") and k[: -len(".weight")] in packed))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                         else "")
        raise UserError(f"{model_dir}: the weights do not cover the model its config.json "
                        f"describes; missing {shown}. Copy the complete weights files, or fix "
                        "config.json (its layer count and sizes) to match them")


def save_model(loaded: LoadedModel, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Write model + processor files into `out_dir` (which the caller made atomic).
    `state_dict`: the weights to write instead of the module's own (a sharded run's gathered
    full state dict)."""
    loaded.model.save_pretrained(str(out_dir), state_dict=state_dict)
    loaded.processor.save_pretrained(str(out_dir))
    # transformers 5 nests the image processor in processor_config.json; older tools and the
    # runtime also look for the classic preprocessor_config.json.
    loaded.processor.image_processor.save_pretrained(str(out_dir))
