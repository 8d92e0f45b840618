"""`edgevlm init`: a new model directory of any family from a preset or a config JSON, with a
tokenizer trained on the data, taken from a model, or brought by a pretrained text LM (the
graft), and optionally a pretrained vision tower: a LLaVA's, or a bare transformers tower folder
(a Dinov2Model, CLIPVisionModel or SiglipVisionModel save_pretrained)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from edgevlm.errors import UserError, check_seed
from edgevlm.families import LoadedModel, family_of, llava, part
from edgevlm.families.backbones import INTERPOLATING_VISION_TYPES, VISION_MODEL_TYPES, has_cls_token
from edgevlm.models.load import read_config, save_model
from edgevlm.models.presets import PRESETS
from edgevlm.models.sizes import check_sizes


def init_model(config_dict: dict, tokenizer, seed: int = 0) -> LoadedModel:
    """A randomly initialised model of the config's family (model_type; LLaVA when absent) whose
    vocabulary and image token match `tokenizer`."""
    cfg = copy.deepcopy(config_dict)
    family = family_of(cfg.pop("model_type", "llava"))
    check_sizes(cfg, "config")
    return family.build(cfg, tokenizer, seed)


def create(out: str | Path, preset: str | None = None, config_path: str | Path | None = None,
           tokenizer_data: list[str | Path] | None = None, tokenizer_from: str | Path | None = None,
           vocab_size: int = 512, seed: int = 0, overwrite: bool = False,
           vision_from: str | Path | None = None,
           text_from: str | Path | None = None) -> LoadedModel:
    """`edgevlm init`: a new model directory from a preset or a LlavaConfig JSON.
    `vision_from`: start the vision tower from that model's weights (same vision config), as a
    LLaVA student starts from the pretrained encoder its teacher uses. `text_from`: a pretrained
    causal LM (HF folder or .gguf) becomes the language model, with its own tokenizer; the
    vision part then comes from the preset, the config or `vision_from` (edgevlm.models.text_lm)."""
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
        from edgevlm.models.text_lm import graft, load_text_lm, text_config_of

        lm = load_text_lm(text_from)
        text_cfg = text_config_of(lm)
        family = family_of(cfg.get("model_type", "llava"))
        if family.text_config_from is not None:  # the family's own decoder (Qwen2-VL's)
            text_cfg = family.text_config_from(text_cfg)
        cfg = {**cfg, "text_config": text_cfg}
        tokenizer = lm.tokenizer
    elif tokenizer_from is not None:
        from transformers import AutoTokenizer

        read_config(tokenizer_from)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    else:
        from edgevlm.data import load_samples
        from edgevlm.models.tokenizer import train_tokenizer

        texts = [t for path in tokenizer_data for s in load_samples(path)
                 for turn in s.turns for t in turn]
        tokenizer = train_tokenizer(texts, vocab_size)
    loaded = init_model(cfg, tokenizer, seed)
    if lm is not None:
        graft(loaded, lm)
    if vision_from is not None:
        copy_vision_tower(loaded.model, vision_from)
        loaded = _tower_image_processor(loaded, vision_from)
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
            cfg = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read LlavaConfig JSON {config_path} ({e})") from e
        if not isinstance(cfg, dict):
            raise UserError(f"--config {config_path} holds a JSON {type(cfg).__name__}, not an "
                            "object of config fields")
        return cfg
    if text_from is not None and vision_from is not None:
        tower = _bare_tower_config(vision_from)
        if tower is not None:  # LlavaConfig's defaults, and CLS dropped where there is one
            return {"vision_config": tower, "vision_feature_select_strategy":
                    "default" if has_cls_token(tower) else "full"}
        src = read_config(vision_from)
        return {k: src[k] for k in ("vision_config", "vision_feature_layer",
                                    "vision_feature_select_strategy", "projector_hidden_act")
                if k in src}
    raise UserError("give --preset or --config" + (" (or --vision-from) for the vision tower"
                                                   if text_from is not None else ""))


def _bare_tower_config(src_dir: str | Path) -> dict | None:
    """The config of a bare vision tower folder (its config.json's model_type is a tower's:
    dinov2, clip_vision_model, siglip_vision_model); None for any other folder."""
    path = Path(src_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if isinstance(cfg, dict) and cfg.get("model_type") in VISION_MODEL_TYPES:
        return cfg
    return None


def _tower_image_processor(loaded: LoadedModel, src_dir: str | Path) -> LoadedModel:
    """A tower that interpolates its positions (DINOv2) sees the images its own processor makes
    (their size sets the image-token count): the LLaVA takes the source's image processor."""
    from transformers import AutoImageProcessor

    vc = loaded.model.config.vision_config
    files = [n for n in ("preprocessor_config.json", "processor_config.json")
             if (Path(src_dir) / n).is_file()]
    if (family_of(loaded.model) is not llava.FAMILY or vc.model_type not in
            INTERPOLATING_VISION_TYPES or not files):
        return loaded
    try:
        images = AutoImageProcessor.from_pretrained(str(src_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"--vision-from {src_dir}: could not read its image processor from "
                        f"{files[0]} ({e}); fix or remove that file") from e
    return llava.use_image_processor(loaded, images)


def _renamed(names: dict, tower) -> dict:
    """Checkpoint tensor names in the module's own spelling: transformers renames some on load
    (DINOv2's `attention.attention.query` is `attention.q_proj` in the module) and back on save."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    renames = [(r.source_patterns[0], r.target_patterns[0])
               for r in get_model_conversion_mapping(tower, add_legacy=False)
               if type(r).__name__ == "WeightRenaming" and len(r.source_patterns) == 1
               and len(r.target_patterns) == 1]
    out = {}
    for name, t in names.items():
        for src, dst in renames:
            name = re.sub(src, dst, name)
        out[name] = t
    return out


def copy_vision_tower(model, src_dir: str | Path) -> None:
    """Load the vision tower weights of the checkpoint in `src_dir` into `model`, reading only
    those tensors (a 7B teacher is never loaded whole). `src_dir` holds a LLaVA-family model or
    a bare tower (a Dinov2Model folder: every tensor is the tower's)."""
    import torch
    from safetensors import safe_open

    bare = _bare_tower_config(src_dir)
    src_cfg = bare if bare is not None else read_config(src_dir)["vision_config"]
    ours = model.config.vision_config.to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "image_size", "patch_size", "num_channels"):
        if key in src_cfg and src_cfg[key] != ours.get(key):
            raise UserError(f"--vision-from {src_dir}: its vision_config.{key} is {src_cfg[key]}, "
                            f"this model's is {ours.get(key)}; give both the same vision tower")
    files = sorted(Path(src_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"--vision-from {src_dir}: no *.safetensors weights in that folder")
    tower = part(model, "vision_tower")
    wanted = tower.state_dict()
    found = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if bare is not None:
                    found[name] = st.get_tensor(name)
                elif "vision_tower." in name:
                    found[name.split("vision_tower.", 1)[1]] = st.get_tensor(name)
    found = _renamed(found, tower)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise UserError(f"--vision-from {src_dir}: the checkpoint lacks vision tower weights such "
                        f"as {missing[0]}; is it a LLaVA model (or a bare tower) with the same "
                        "vision tower?")
    with torch.no_grad():
        for name, t in wanted.items():
            if found[name].shape != t.shape:
                raise UserError(f"--vision-from {src_dir}: vision weight {name} has shape "
                                f"{tuple(found[name].shape)}, this model needs {tuple(t.shape)}")
            t.copy_(found[name].to(t.dtype))
