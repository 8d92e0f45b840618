"""Reading an export directory: edgevlm.json first, the copied Hugging Face files as fallback.

The manifest (runtime/contract.py) is the source of truth the runtime needs. It is read
tolerantly: a key the manifest lacks is taken from the model files the exporter copies beside
it (config.json, generation_config.json, tokenizer_config.json, chat_template.jinja,
processor_config.json / preprocessor_config.json), so an export made by an older exporter, or one
edited by hand, still loads. What cannot be found is a UserError naming the key and the fix.

Every value is read with the type the runtime needs (runtime.fields): a field of another type is one
line naming the file and the field. Every file read here lies inside the export, symlinks
resolved (runtime.paths.check_inside). The sizes the runtime allocates by are checked before
anything is allocated (runtime.limits): a builder or mobile context within the model's
max_position_embeddings and its KV cache within the machine's memory, image sizes within 4096
px, and the mobile rope table's .npy header (a numeric (2, context, head_dim) array, never an
object array that np.load would unpickle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.runtime.chat import special_tokens_from_config
from edgevlm.runtime.contract import (
    COMPONENTS,
    FORMAT_VERSION,
    MANIFEST,
    PRECISIONS,
    ROPE_FILE,
    DecoderKind,
    Profile,
    graph_file,
)
from edgevlm.runtime.fields import REEXPORT, Fields, is_id, is_int, read_json
from edgevlm.runtime.limits import KV_BYTES, check_kv_memory, kv_bytes, shown
from edgevlm.runtime.patch_images import PatchFamily
from edgevlm.runtime.patches import PatchConfig
from edgevlm.runtime.paths import check_graph_files, check_inside
from edgevlm.runtime.preprocess import SOURCE, ImageProcessorConfig
from edgevlm.runtime.static import check_rope_table
from edgevlm.runtime.tiling import TilingConfig
from edgevlm.runtime.token_select import METHODS as TOKEN_SELECT

# The families this runtime runs, and how each takes images: one image per row (LLaVA), cut into
# tiles (Idefics3 / SmolVLM: the tiled vision IO, image recipe and <image> expansion), or as
# patches at the image's own resolution with M-RoPE positions (Qwen2-VL; Qwen2.5-VL's tower
# attends in windows). The one place the runtime reads a family name; the rest asks
# ExportInfo.tiled / .patches.
FAMILIES = {"llava": "fixed", "idefics3": "tiles", "qwen2_vl": "patches",
            "qwen2_5_vl": "patches"}



@dataclass(frozen=True)
class ExportInfo:
    """Everything the runtime reads from an export directory, resolved and checked."""

    root: Path
    format_version: int
    precision: str  # the precision asked for, or "mixed"/the manifest's when none was asked
    graphs: dict[str, Path]  # component -> absolute graph path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int | None  # None: the runtime looks up "<image>" in the tokenizer
    num_image_tokens: int
    eos_token_ids: tuple[int, ...]
    max_position_embeddings: int
    chat_template: str
    special_tokens: dict[str, str]
    image_processor: ImageProcessorConfig | TilingConfig  # TilingConfig: idefics3
    tokenizer_file: Path
    profile: Profile = Profile.DEFAULT  # MOBILE runs the static graphs
    context: int | None = None  # mobile: the fixed cache's positions; builder decoder: its KV
    # buffers' (prompt + answer either way)
    rope_file: Path | None = None  # mobile: the rotary cos/sin table (contract.ROPE_FILE)
    decoder: DecoderKind = DecoderKind.TRACED  # exports before version 3 are traced
    family: str = "llava"  # FAMILIES: the vision IO, image recipe and <image> expansion
    token_select: str | None = None  # runtime.token_select method keeping num_image_tokens
    vision_tokens: int | None = None  # what the vision graph gives per image, before selection
    patch_family: PatchFamily | None = None  # a patch family's settings (Qwen2-VL)

    @property
    def tiled(self) -> bool:
        """Whether images arrive as tiles (the family's vision IO, recipe and expansion)."""
        return FAMILIES[self.family] == "tiles"

    @property
    def patches(self) -> str | None:
        """A patch family's vision IO ("full" or "windowed"; runtime.contract.vision_io)."""
        return None if self.patch_family is None else self.patch_family.kind

    @property
    def max_tokens(self) -> int:
        """Positions a prompt and its answer may take together."""
        return self.context or self.max_position_embeddings

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_image_tokens",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{self.root / MANIFEST}: {name}={shown(value)} must be a positive "
                                f"integer; {REEXPORT}")
        if not self.eos_token_ids:
            raise UserError(f"{self.root}: no eos_token_id in edgevlm.json, generation_config.json "
                            f"or config.json, so generation could never stop; {REEXPORT}")
        assert set(self.graphs) == set(COMPONENTS), f"graphs for {sorted(self.graphs)}"
        if self.token_select is not None and self.token_select not in TOKEN_SELECT:
            raise UserError(f"{self.root / MANIFEST}: token_select {shown(self.token_select)} is "
                            f"unknown to this runtime (it knows {', '.join(TOKEN_SELECT)}): pip "
                            "install -U edgevlm")
        if self.family not in FAMILIES:
            raise UserError(f"{self.root / MANIFEST}: family {shown(self.family)} is unknown to "
                            f"this runtime (it knows {', '.join(FAMILIES)}): pip install -U "
                            "edgevlm")
        if self.decoder is DecoderKind.BUILDER and (not isinstance(self.context, int)
                                                    or self.context < 2):
            raise UserError(f"{self.root / MANIFEST}: a builder decoder needs decoder.max_context "
                            f"(its KV buffer length); {REEXPORT}")
        if self.profile is Profile.MOBILE and (self.context is None or self.rope_file is None
                                         or not self.rope_file.is_file()):
            raise UserError(f"{self.root}: a mobile export needs static_shapes.context and "
                            f"{ROPE_FILE} in {MANIFEST}; {REEXPORT} --profile mobile")


def _first(*values):
    return next((v for v in values if v is not None), None)


def _graphs(root: Path, manifest: Fields, precision: str | None) -> tuple[str, dict[str, Path]]:
    """Component graph paths: the manifest's, or the contract's file names at `precision`."""
    components = manifest.obj("components")
    if precision is not None:
        if precision not in PRECISIONS:
            raise UserError(f"precision {shown(precision)} is unknown; choose one of "
                            f"{', '.join(PRECISIONS)}")
        graphs = {c: root / graph_file(c, precision) for c in COMPONENTS}
        missing = [p for p in graphs.values() if not p.is_file()]
        decoder = components.raw("decoder_model_merged")
        if missing and isinstance(decoder, dict) and decoder.get("precision") == precision:
            # the export as written, e.g. `--precision int4`'s int8 vision encoder beside the
            # int4 decoder: asking for its decoder's precision asks for it
            return _graphs(root, manifest, None)
        if missing:
            have = [p for p in PRECISIONS
                    if all((root / graph_file(c, p)).is_file() for c in COMPONENTS)]
            raise UserError(f"{root} has no {precision} graphs ({missing[0].name} is missing); "
                            f"precisions in this export: {', '.join(have) or 'none complete'}")
        return precision, graphs
    graphs, precisions = {}, set()
    for c in COMPONENTS:
        entry = components.raw(c)
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict) or not entry.get("file"):
            raise UserError(f"{root / MANIFEST}: components.{c}.file is missing; {REEXPORT}")
        fields = Fields(components.path, entry, f"components.{c}.")
        graphs[c] = root / fields.text("file")
        precisions.add(fields.text("precision") or "fp32")
    for path in graphs.values():
        if not path.is_file():
            raise UserError(f"graph {shown(str(path), 120)} named in {MANIFEST} is missing; "
                            f"{REEXPORT}")
    return (precisions.pop() if len(precisions) == 1 else "mixed"), graphs


def _image_processor(root: Path, manifest: Fields) -> ImageProcessorConfig | TilingConfig:
    """The first of edgevlm.json's image_processor (or preprocessor), processor_config.json's
    image_processor and preprocessor_config.json."""
    processor = read_json(root, "processor_config.json")
    for fields, key in ((manifest, "image_processor"), (manifest, "preprocessor"),
                        (processor, "image_processor")):
        if fields.has(key):
            settings = fields.obj(key).data
            break
    else:
        settings = read_json(root, "preprocessor_config.json").data or None
    if settings is None:
        raise UserError(f"{root}: no image processor settings (edgevlm.json image_processor, "
                        f"processor_config.json or preprocessor_config.json); {REEXPORT}")
    layout = FAMILIES.get(manifest.text("family") or "llava", "fixed")
    tiled = layout == "tiles"
    if layout == "patches":  # any size: the processor resizes each image to its own grid
        return PatchConfig.from_hf(settings)
    if tiled:
        config = TilingConfig.from_hf(settings)
        size = (config.tile, config.tile)
    else:
        config = ImageProcessorConfig.from_hf(settings)
        size = config.output_size
    # The vision tower takes images (or tiles) of its own size: any other is refused here, in
    # one line, instead of by onnxruntime inside the encoder's first layer. A tower that
    # interpolates its positions (DINOv2) takes its processor's size, which the export records.
    vision, field = manifest.integer("vision_image_size"), "edgevlm.json vision_image_size"
    if vision is None:
        vision = read_json(root, "config.json").obj("vision_config").integer("image_size")
        field = "config.json vision_config.image_size"
    if vision is not None and size != (vision, vision):
        made = (f"{size[0]}x{size[1]} px {'tiles' if tiled else 'images'}" if size else
                "images of each input's own shape (no fixed size or crop)")
        raise UserError(f"{root}: the image processor makes {made} but the vision encoder takes "
                        f"{vision}x{vision} ({field}); fix {SOURCE}, or re-export")
    return config


def _patch_family(root: Path, manifest: Fields, image_processor) -> PatchFamily | None:
    """A patch family's token ids and tower window (config.json); None for the others."""
    if not isinstance(image_processor, PatchConfig):
        return None
    config = read_json(root, "config.json")
    vision = config.obj("vision_config")
    full = vision.raw("fullatt_block_indexes")
    depth = vision.integer("depth")
    windowed = isinstance(full, list) and depth is not None and len(full) < depth
    return PatchFamily(image_processor, config.token("vision_start_token_id"),
                       config.token("vision_end_token_id"),
                       vision.integer("window_size") if windowed else None)


def _chat_template(root: Path, manifest: Fields, tok_cfg: Fields) -> str:
    is_template = (lambda v: isinstance(v, (str, list)), "a string or a list of {name, template}")
    template = manifest.checked("chat_template", *is_template)
    path = check_inside(root, root / "chat_template.jinja", "chat_template.jinja")
    if not template and path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason}); {REEXPORT}") from e
    template = template or tok_cfg.checked("chat_template", *is_template)
    if isinstance(template, list):  # [{name, template}, ...]: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise UserError(f"{root}: no chat template (edgevlm.json chat_template, "
                        f"chat_template.jinja or tokenizer_config.json); {REEXPORT}")
    return template


def _model_fields(root: Path, m: Fields, tok_cfg: Fields, tokenizer_file: Path) -> dict:
    """The model's sizes and token ids: edgevlm.json's, else config.json's and the others'."""
    config = read_json(root, "config.json")
    text = config.obj("text_config")
    gen = read_json(root, "generation_config.json")
    heads, hidden = text.integer("num_attention_heads"), text.integer("hidden_size")
    added_eos = _added_token_id(root, tokenizer_file, tok_cfg.raw("eos_token"))
    return dict(
        num_layers=_first(m.integer("num_layers"), text.integer("num_hidden_layers")),
        num_kv_heads=_first(m.integer("num_kv_heads"), text.integer("num_key_value_heads"),
                            heads),
        head_dim=_first(m.integer("head_dim"), text.integer("head_dim"),
                        hidden // heads if heads and hidden else None),
        image_token_id=_first(m.token("image_token_id"), config.token("image_token_index"),
                              config.token("image_token_id")),
        num_image_tokens=_first(m.integer("num_image_tokens"), config.integer("image_seq_length")),
        eos_token_ids=_first(m.ids("eos_token_id"), gen.ids("eos_token_id"),
                             text.ids("eos_token_id"),
                             None if added_eos is None else (added_eos,), ()),
        max_position_embeddings=_first(m.integer("max_position_embeddings"),
                                       text.integer("max_position_embeddings")))


def read_export(export_dir: str | Path, precision: str | None = None) -> ExportInfo:
    """Resolve and check an export directory (see the module docstring for the fallbacks)."""
    root = Path(export_dir)
    if not root.is_dir():
        raise UserError(f"export directory {root} does not exist; make it with "
                        "`edgevlm export MODEL --out DIR`")
    m = read_json(root, MANIFEST, required=True)
    version = m.raw("format_version")
    if not is_int(version):
        raise UserError(f"{root / MANIFEST} has no integer format_version; {REEXPORT}")
    if version > FORMAT_VERSION:
        raise UserError(f"{root} is format version {version}, made by a newer edgevlm; this "
                        f"runtime reads up to version {FORMAT_VERSION}: pip install -U edgevlm")
    chosen, graphs = _graphs(root, m, precision)
    for graph in graphs.values():  # nothing the export names may lead outside it
        check_graph_files(root, graph)
    rope = m.text("rope_file")
    rope_file = check_inside(root, root / rope, "edgevlm.json's rope_file") if rope else None
    decoder, shapes = m.obj("decoder"), m.obj("static_shapes")
    tok_cfg = read_json(root, "tokenizer_config.json")
    tokenizer_file = check_inside(root, root / "tokenizer.json", "tokenizer.json")
    if not tokenizer_file.is_file():
        raise UserError(f"{root} has no tokenizer.json; {REEXPORT}")
    image_processor = _image_processor(root, m)
    info = ExportInfo(
        root=root, format_version=version, precision=chosen, graphs=graphs,
        **_model_fields(root, m, tok_cfg, tokenizer_file),
        chat_template=_chat_template(root, m, tok_cfg),
        special_tokens=special_tokens_from_config(tok_cfg.data),
        image_processor=image_processor,
        tokenizer_file=tokenizer_file,
        profile=_member(Profile, m.text("profile") or "default", root, "profile"),
        context=_first(shapes.integer("context"), decoder.integer("max_context")),
        rope_file=rope_file,
        decoder=_member(DecoderKind, decoder.text("kind") or "traced", root, "decoder.kind"),
        family=m.text("family") or "llava",
        token_select=m.obj("token_select").text("method"),
        vision_tokens=m.integer("vision_tokens"),
        patch_family=_patch_family(root, m, image_processor))
    field = "static_shapes.context" if shapes.has("context") else "decoder.max_context"
    _check_sizes(info, field, KV_BYTES.get(decoder.text("activations") or "fp32", 4))
    return info


def _check_sizes(info: ExportInfo, field: str, element: int) -> None:
    """What the runtime allocates by, checked before anything is: the context a builder or
    mobile decoder preallocates its KV cache for lies within the model's positions and its
    bytes (layers x 2 x kv_heads x head_dim x context x `element` bytes) within the machine's
    memory; without one, an image prompt's cache must fit; a mobile rope table is numeric."""
    where, limit = info.root / MANIFEST, info.max_position_embeddings
    if info.context is not None and info.context > limit:
        raise UserError(f"{where}: {field}={info.context} is past the model's "
                        f"max_position_embeddings {limit}; {REEXPORT} --max-context N with N "
                        f"at most {limit}")
    if info.num_image_tokens >= info.max_tokens:
        raise UserError(f"{where}: num_image_tokens={info.num_image_tokens} leaves no room for "
                        f"the question in the {info.max_tokens} positions a prompt may take; "
                        f"{REEXPORT}")
    positions = info.context or info.num_image_tokens + 1
    nbytes = kv_bytes(info.num_layers, info.num_kv_heads, info.head_dim, positions, element)
    shape = (f"(num_layers {info.num_layers} x 2 x num_kv_heads {info.num_kv_heads} x head_dim "
             f"{info.head_dim} x {element} bytes per position)")
    if info.context is not None:
        check_kv_memory(nbytes, f"{where}: {field}={info.context} {shape}",
                        f"lower {field}: re-export with a smaller --max-context")
    else:
        check_kv_memory(nbytes, f"{where}: one image's {info.num_image_tokens} tokens {shape}",
                        "these sizes do not describe a model that runs here; re-export")
    if info.profile is Profile.MOBILE:
        check_rope_table(info.rope_file, info.context, info.head_dim)


def _member(kind, value: str, root: Path, key: str):
    """edgevlm.json's `key` as a member of the enum `kind`; an export from a newer edgevlm may
    name one this runtime does not know."""
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{root / MANIFEST}: {key} {shown(value)} is unknown to this runtime (it "
                        f"knows {', '.join(k.value for k in kind)}): pip install -U "
                        "edgevlm") from None


def _added_token_id(root: Path, tokenizer_file: Path, token) -> int | None:
    """The id of a special token (str or {"content": ...}) in tokenizer.json's added tokens."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        return None
    added = read_json(root, tokenizer_file.name).raw("added_tokens")
    if not isinstance(added, list):
        return None
    return next((t["id"] for t in added if isinstance(t, dict) and t.get("content") == content
                 and is_id(t.get("id"))), None)


def with_pixel_bounds(info: ExportInfo, min_pixels: int | None,
                      max_pixels: int | None) -> ExportInfo:
    """The export with a patch family's resize bounds replaced (VLM.load's min/max_pixels)."""
    if min_pixels is None and max_pixels is None:
        return info
    family = info.patch_family
    if family is None:
        raise UserError(f"min_pixels / max_pixels bound the images of a family that resizes each "
                        f"to its own size (Qwen2-VL); {info.root} is a {info.family} export, "
                        "whose images take one fixed size: drop them")
    changes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
               if v is not None}
    config = family.config.replace(**changes)
    return replace(info, image_processor=config, patch_family=replace(family, config=config))
