"""The image settings an export takes from its flags and the model folder: a tiled family's
splitting (--[no-]image-splitting), a patch family's pixel bounds (--min-pixels / --max-pixels),
and the visual-token count a model was trained at. Each is set on the loaded processor, which the
reference, the manifest and the processor files all read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.export.config import ExportConfig
from edgevlm.families import family_of
from edgevlm.runtime.contract import Profile


def set_image_splitting(loaded, family, config: ExportConfig, model_dir: Path) -> None:
    """A tiled model's image recipe for the export: the processor's, or --[no-]image-splitting.
    The reference, the manifest and the processor files all read it from the processor. The
    mobile profile's vision graph takes a fixed tile count, which splitting does not give (1 to
    many tiles by aspect ratio): it takes the global image only."""
    if not family.tiled:
        return
    images = loaded.processor.image_processor
    if config.image_splitting is not None:
        images.do_image_splitting = config.image_splitting
    if config.profile is Profile.MOBILE and images.do_image_splitting:
        raise UserError(f"--profile mobile traces the vision encoder at a fixed tile count, but "
                        f"{model_dir}'s image processor splits images (do_image_splitting: 1 "
                        "to many tiles by aspect ratio); add --no-image-splitting (each image "
                        f"is its one global tile, {loaded.num_image_tokens} tokens) or export "
                        "with --profile default")


def set_pixel_bounds(loaded, config: ExportConfig):
    """--min-pixels / --max-pixels into a patch family's processor (the reference, manifest and
    processor files read them there); the most tokens an image can now take."""
    family = family_of(loaded.model)
    if not (config.min_pixels or config.max_pixels):
        return loaded
    family.set_pixel_bounds(loaded.processor, config.min_pixels, config.max_pixels)
    return replace(loaded, num_image_tokens=family.max_image_tokens(loaded.processor))


def pixel_bounds_into_files(tmp: Path, info: dict, config: ExportConfig) -> None:
    """The export's preprocessor files carry --min-pixels / --max-pixels as transformers(.js)
    read them (`size`), as edgevlm.json's image_processor does."""
    if not (config.min_pixels or config.max_pixels):
        return
    size = info["image_processor"]["size"]
    for name, key in (("preprocessor_config.json", None), ("processor_config.json",
                                                           "image_processor")):
        path = tmp / name
        if path.is_file():
            data = json.loads(path.read_text())
            (data.setdefault(key, {}) if key else data)["size"] = size
            path.write_text(json.dumps(data, indent=2))


def trained_token_setting(config: ExportConfig, model_cfg: dict, model_dir: Path
                           ) -> ExportConfig:
    """A model trained at fewer visual tokens (edgevlm.models.token_reduce) exports at that
    count."""
    from edgevlm.models.token_reduce import CONFIG_KEY

    trained = model_cfg.get(CONFIG_KEY)
    if not trained:
        return config
    if config.visual_tokens is None:
        return replace(config, visual_tokens=trained["tokens"], token_select=trained["method"])
    if (config.visual_tokens, config.token_select) != (trained["tokens"], trained["method"]):
        raise UserError(f"{model_dir} was trained at {trained['tokens']} visual tokens "
                        f"({trained['method']}); export it with those (drop --visual-tokens) "
                        "or export its full-token parent")
    return config
