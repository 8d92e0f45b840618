"""Create and load models of every family edgevlm knows (edgevlm.families: LLaVA, Idefics3).

A model is a plain Hugging Face directory, so the same code loads our tiny presets and a real
checkpoint such as llava-hf/llava-interleave-qwen-0.5b-hf. Presets are LlavaConfig dicts; any
LlavaConfig JSON (CLIP or SigLIP vision, Llama or Qwen2 text) works through `--config`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm import token_reduce
from edgevlm.errors import UserError, check_seed
from edgevlm.families import family_of, part, supported_model_types
from edgevlm.presets import PRESETS

SUPPORTED_MODEL_TYPES = supported_model_types()
SUPPORTED_VISION = ("siglip_vision_model", "clip_vision_model")
SUPPORTED_TEXT = ("qwen2", "llama", "qwen2_moe")


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # the family's model class (LlavaForConditionalGeneration, ...)
    processor: Any  # and its processor (LlavaProcessor, Idefics3Processor)
    image_token_id: int
    num_image_tokens: int


def num_image_tokens(config) -> int:
    """Image tokens per image, as the family's processor expands `<image>`."""
    return family_of(config).num_image_tokens(config)


def check_config(cfg: dict, where: str) -> None:
    """Reject a LlavaConfig dict whose sizes cannot work, naming the field."""
    if cfg.get("model_type", "llava") != "llava":
        raise UserError(f"{where}: model_type {cfg.get('model_type')!r} is not LLaVA-family; "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for sub_name, allowed in (("vision_config", SUPPORTED_VISION), ("text_config", SUPPORTED_TEXT)):
        sub = cfg.get(sub_name)
        if not isinstance(sub, dict):
            raise UserError(f"{where}: {sub_name} is missing; give a {sub_name} with a model_type")
        if sub.get("model_type") not in allowed:
            raise UserError(f"{where}: {sub_name}.model_type {sub.get('model_type')!r} is not "
                            f"supported; use one of {', '.join(allowed)}")
        heads = sub.get("num_attention_heads", 1)
        if sub.get("hidden_size", heads) % heads:
            raise UserError(f"{where}: {sub_name}.hidden_size {sub['hidden_size']} is not "
                            f"divisible by num_attention_heads {heads}; pick sizes that divide")
        kv = sub.get("num_key_value_heads")
        if kv and heads % kv:
            raise UserError(f"{where}: {sub_name}.num_attention_heads {heads} is not divisible by "
                            f"num_key_value_heads {kv}; pick sizes that divide")
    vc = cfg["vision_config"]
    if vc.get("image_size", 224) % vc.get("patch_size", 16):
        raise UserError(f"{where}: vision_config.image_size {vc.get('image_size')} is not "
                        f"divisible by patch_size {vc.get('patch_size')}")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UserError(f"{where}: vision_feature_select_strategy {strategy!r} must be "
                        "'default' (drop CLS) or 'full'")
    if strategy == "default" and vc["model_type"] == "siglip_vision_model":
        raise UserError(f"{where}: strategy 'default' drops a CLS token that SigLIP does not have; "
                        "use vision_feature_select_strategy 'full'")


def make_image_processor(vision_config):
    """The HF image processor a LLaVA checkpoint of this vision tower ships with."""
    size = vision_config.image_size
    if vision_config.model_type == "clip_vision_model":
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


def init_model(config_dict: dict, tokenizer, seed: int = 0) -> LoadedModel:
    """A randomly initialised model of the config's family (model_type; LLaVA when absent) whose
    vocabulary and image token match `tokenizer`."""
    cfg = copy.deepcopy(config_dict)
    return family_of(cfg.pop("model_type", "llava")).build(cfg, tokenizer, seed)


def init_llava(cfg: dict, tokenizer, seed: int = 0) -> LoadedModel:
    """A random LlavaForConditionalGeneration and LlavaProcessor around `tokenizer`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_config(cfg, "config")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise UserError("the tokenizer has no <image> token; build it with edgevlm init "
                        "--tokenizer-data or add <image> as a special token")
    vocab = len(tokenizer)
    cfg["text_config"]["vocab_size"] = vocab
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg["text_config"][key] = getattr(tokenizer, key)
    cfg["image_token_index"] = image_token_id
    try:
        config = LlavaConfig(**cfg)
    except (ValueError, TypeError) as e:  # transformers' own checks (rope dims, unknown keys)
        raise UserError(f"config: {e}") from e
    config.image_seq_length = num_image_tokens(config)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=make_image_processor(config.vision_config),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if config.vision_config.model_type == "clip_vision_model"
        else 0,
        chat_template=tokenizer.chat_template,
    )
    return LoadedModel(model, processor, image_token_id, config.image_seq_length)


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
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{model_dir}: model_type {cfg.get('model_type')!r} is not a model "
                        f"family edgevlm knows; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return cfg


def load_model(model_dir: str | Path, dtype=None, device: str | None = None,
               dequantize: bool = False, reduce_tokens: bool = True) -> LoadedModel:
    """Load a LLaVA-family checkpoint directory and its processor. `dequantize`: a
    compressed-tensors checkpoint comes back as plain Linears holding (q − z)·s exactly."""
    import torch
    import transformers
    from transformers import AutoProcessor

    from edgevlm.quant.checkpoint import decompress, mixed_bits

    model_class = getattr(transformers, family_of(read_config(model_dir)).model_class)
    kw = {}
    # transformers' dequantize-on-load reads every layer with one config group's bits; a mixed
    # checkpoint (symmetric, QuantConfig.layer_bits) loads plainly and is decompressed after
    mixed = dequantize and bool(mixed_bits(model_dir))
    if dequantize and not mixed:
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        model = model_class.from_pretrained(str(model_dir), dtype=dtype or torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 -- only the weight files' own errors are renamed
        if type(e).__name__ == "SafetensorError":
            raise UserError(f"{model_dir}: a weights file is damaged or truncated ({e}); copy "
                            "or download the model again") from e
        if isinstance(e, OSError) and "no file named" in str(e):
            raise UserError(f"{model_dir} has no weights (no model.safetensors); copy the "
                            "whole model folder, or make one with `edgevlm init`") from e
        raise
    if mixed:
        decompress(model)
    if device:
        model = model.to(device)
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: could not load the processor ({e}); the folder needs "
                        "tokenizer and preprocessor_config.json files") from e
    image_token_id = getattr(model.config, family_of(model).image_token_key)
    loaded = LoadedModel(model, processor, image_token_id, num_image_tokens(model.config))
    reduced = token_reduce.setting(model.config)
    if reduced and reduce_tokens:  # trained at a reduced visual token count: keep seeing it
        loaded = token_reduce.install(loaded, reduced["method"], reduced["tokens"])
    return loaded


def save_model(loaded: LoadedModel, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Write model + processor files into `out_dir` (which the caller made atomic).
    `state_dict`: the weights to write instead of the module's own (a sharded run's gathered
    full state dict)."""
    loaded.model.save_pretrained(str(out_dir), state_dict=state_dict)
    loaded.processor.save_pretrained(str(out_dir))
    # transformers 5 nests the image processor in processor_config.json; older tools and the
    # runtime also look for the classic preprocessor_config.json.
    loaded.processor.image_processor.save_pretrained(str(out_dir))


def create(out: str | Path, preset: str | None = None, config_path: str | Path | None = None,
           tokenizer_data: list[str | Path] | None = None, tokenizer_from: str | Path | None = None,
           vocab_size: int = 512, seed: int = 0, overwrite: bool = False,
           vision_from: str | Path | None = None,
           text_from: str | Path | None = None) -> LoadedModel:
    """`edgevlm init`: a new model directory from a preset or a LlavaConfig JSON.
    `vision_from`: start the vision tower from that model's weights (same vision config), as a
    LLaVA student starts from the pretrained encoder its teacher uses. `text_from`: a pretrained
    causal LM (HF folder or .gguf) becomes the language model, with its own tokenizer; the
    vision part then comes from the preset, the config or `vision_from` (edgevlm.text_lm)."""
    from edgevlm.atomic import atomic_dir, check_new

    check_seed(seed)
    cfg = _vision_source_config(preset, config_path, vision_from, text_from)
    if text_from is not None:
        if tokenizer_data or tokenizer_from is not None:
            raise UserError("--text-from brings the LM's own tokenizer; drop --tokenizer-data / "
                            "--tokenizer-from")
    elif (not tokenizer_data) == (tokenizer_from is None):
        raise UserError("give exactly one of --tokenizer-data or --tokenizer-from")
    inputs = [text_from, vision_from, tokenizer_from, config_path, *(tokenizer_data or [])]
    check_new(Path(out), overwrite, inputs)  # before minutes of loading, not after
    lm = None
    if text_from is not None:
        from edgevlm.text_lm import graft, load_text_lm, text_config_of

        lm = load_text_lm(text_from)
        cfg = {**cfg, "text_config": text_config_of(lm)}
        tokenizer = lm.tokenizer
    elif tokenizer_from is not None:
        from transformers import AutoTokenizer

        read_config(tokenizer_from)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    else:
        from edgevlm.data import load_samples
        from edgevlm.tokenizer import train_tokenizer

        texts = [t for path in tokenizer_data for s in load_samples(path)
                 for turn in s.turns for t in turn]
        tokenizer = train_tokenizer(texts, vocab_size)
    loaded = init_model(cfg, tokenizer, seed)
    if lm is not None:
        graft(loaded, lm)
    if vision_from is not None:
        copy_vision_tower(loaded.model, vision_from)
    with atomic_dir(out, overwrite, inputs) as tmp:
        save_model(loaded, tmp)
    return loaded


def _vision_source_config(preset, config_path, vision_from, text_from) -> dict:
    """The LlavaConfig dict `init` starts from. With `text_from` only its vision part counts, and
    a `vision_from` model alone may supply it."""
    if preset is not None and config_path is not None:
        raise UserError("give only one of --preset or --config")
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[preset])
    if config_path is not None:
        try:
            return json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read LlavaConfig JSON {config_path} ({e})") from e
    if text_from is not None and vision_from is not None:
        src = read_config(vision_from)
        return {k: src[k] for k in ("vision_config", "vision_feature_layer",
                                    "vision_feature_select_strategy", "projector_hidden_act")
                if k in src}
    raise UserError("give --preset or --config" + (" (or --vision-from) for the vision tower"
                                                   if text_from is not None else ""))


def copy_vision_tower(model, src_dir: str | Path) -> None:
    """Load the vision tower weights of the checkpoint in `src_dir` into `model`, reading only
    those tensors (a 7B teacher is never loaded whole)."""
    import torch
    from safetensors import safe_open

    src_cfg = read_config(src_dir)["vision_config"]
    ours = model.config.vision_config.to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "image_size", "patch_size", "num_channels"):
        if key in src_cfg and src_cfg[key] != ours.get(key):
            raise UserError(f"--vision-from {src_dir}: its vision_config.{key} is {src_cfg[key]}, "
                            f"this model's is {ours.get(key)}; give both the same vision tower")
    files = sorted(Path(src_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"--vision-from {src_dir}: no *.safetensors weights in that folder")
    wanted = part(model, "vision_tower").state_dict()
    found = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if "vision_tower." in name:
                    found[name.split("vision_tower.", 1)[1]] = st.get_tensor(name)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise UserError(f"--vision-from {src_dir}: the checkpoint lacks vision tower weights such "
                        f"as {missing[0]}; is it a LLaVA model with the same vision tower?")
    with torch.no_grad():
        for name, t in wanted.items():
            if found[name].shape != t.shape:
                raise UserError(f"--vision-from {src_dir}: vision weight {name} has shape "
                                f"{tuple(found[name].shape)}, this model needs {tuple(t.shape)}")
            t.copy_(found[name].to(t.dtype))
