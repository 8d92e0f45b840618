"""Reading an export directory: edgevlm.json first, the copied Hugging Face files as fallback.

The manifest (runtime/contract.py) is the source of truth the runtime needs. It is read
tolerantly: a key the manifest lacks is taken from the model files the exporter copies beside
it (config.json, generation_config.json, tokenizer_config.json, chat_template.jinja,
processor_config.json / preprocessor_config.json), so an export made by an older exporter, or one
edited by hand, still loads. What cannot be found is a UserError naming the key and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from edgevlm.runtime.paths import check_graph_files, check_inside
from edgevlm.runtime.preprocess import ImageProcessorConfig
from edgevlm.runtime.tiling import TilingConfig
from edgevlm.runtime.token_select import METHODS as TOKEN_SELECT

# The families this runtime runs, and whether each cuts images into tiles (Idefics3 / SmolVLM:
# the tiled vision IO, image recipe and <image> expansion) or takes one image per row (LLaVA).
# The one place the runtime reads a family name; the rest asks ModelInfo.tiled.
FAMILIES = {"llava": False, "idefics3": True}

REEXPORT = "re-run `edgevlm export MODEL --out DIR`"


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

    @property
    def tiled(self) -> bool:
        """Whether images arrive as tiles (the family's vision IO, recipe and expansion)."""
        return FAMILIES[self.family]

    @property
    def max_tokens(self) -> int:
        """Positions a prompt and its answer may take together."""
        return self.context or self.max_position_embeddings

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_image_tokens",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{self.root / MANIFEST}: {name}={value!r} must be a positive "
                                f"integer; {REEXPORT}")
        if not self.eos_token_ids:
            raise UserError(f"{self.root}: no eos_token_id in edgevlm.json, generation_config.json "
                            f"or config.json, so generation could never stop; {REEXPORT}")
        assert set(self.graphs) == set(COMPONENTS), f"graphs for {sorted(self.graphs)}"
        if self.token_select is not None and self.token_select not in TOKEN_SELECT:
            raise UserError(f"{self.root / MANIFEST}: token_select {self.token_select!r} is "
                            f"unknown to this runtime (it knows {', '.join(TOKEN_SELECT)}): pip "
                            "install -U edgevlm")
        if self.family not in FAMILIES:
            raise UserError(f"{self.root / MANIFEST}: family {self.family!r} is unknown to this "
                            f"runtime (it knows {', '.join(FAMILIES)}): pip install -U edgevlm")
        if self.decoder is DecoderKind.BUILDER and (not isinstance(self.context, int)
                                                    or self.context < 2):
            raise UserError(f"{self.root / MANIFEST}: a builder decoder needs decoder.max_context "
                            f"(its KV buffer length); {REEXPORT}")
        if self.profile is Profile.MOBILE and (self.context is None or self.rope_file is None
                                         or not self.rope_file.is_file()):
            raise UserError(f"{self.root}: a mobile export needs static_shapes.context and "
                            f"{ROPE_FILE} in {MANIFEST}; {REEXPORT} --profile mobile")


def _json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise UserError(f"{path.parent} is not an edgevlm export (no {path.name}); make one "
                            "with `edgevlm export MODEL --out DIR`")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {REEXPORT}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; {REEXPORT}")
    return data


def _first(*values):
    return next((v for v in values if v is not None), None)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _graphs(root: Path, manifest: dict, precision: str | None) -> tuple[str, dict[str, Path]]:
    """Component graph paths: the manifest's, or the contract's file names at `precision`."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise UserError(f"precision {precision!r} is unknown; choose one of "
                            f"{', '.join(PRECISIONS)}")
        graphs = {c: root / graph_file(c, precision) for c in COMPONENTS}
        missing = [p for p in graphs.values() if not p.is_file()]
        decoder = (manifest.get("components") or {}).get("decoder_model_merged")
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
    components = manifest.get("components") or {}
    graphs, precisions = {}, set()
    for c in COMPONENTS:
        entry = components.get(c)
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict) or not entry.get("file"):
            raise UserError(f"{root / MANIFEST}: components.{c}.file is missing; {REEXPORT}")
        graphs[c] = root / entry["file"]
        precisions.add(entry.get("precision", "fp32"))
    for path in graphs.values():
        if not path.is_file():
            raise UserError(f"graph {path} named in {MANIFEST} is missing; {REEXPORT}")
    return (precisions.pop() if len(precisions) == 1 else "mixed"), graphs


def _image_processor(root: Path, manifest: dict) -> ImageProcessorConfig | TilingConfig:
    settings = _first(manifest.get("image_processor"), manifest.get("preprocessor"))
    if not isinstance(settings, dict):
        settings = _json(root / "processor_config.json").get("image_processor")
    if not isinstance(settings, dict):
        settings = _json(root / "preprocessor_config.json") or None
    if settings is None:
        raise UserError(f"{root}: no image processor settings (edgevlm.json image_processor, "
                        f"processor_config.json or preprocessor_config.json); {REEXPORT}")
    if FAMILIES.get(manifest.get("family", "llava"), False):
        return TilingConfig.from_hf(settings)
    return ImageProcessorConfig.from_hf(settings)


def _chat_template(root: Path, manifest: dict, tok_cfg: dict) -> str:
    template = manifest.get("chat_template")
    if not template and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    template = template or tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise UserError(f"{root}: no chat template (edgevlm.json chat_template, "
                        f"chat_template.jinja or tokenizer_config.json); {REEXPORT}")
    return template


def read_export(export_dir: str | Path, precision: str | None = None) -> ExportInfo:
    """Resolve and check an export directory (see the module docstring for the fallbacks)."""
    root = Path(export_dir)
    if not root.is_dir():
        raise UserError(f"export directory {root} does not exist; make it with "
                        "`edgevlm export MODEL --out DIR`")
    m = _json(root / MANIFEST, required=True)
    version = m.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{root / MANIFEST} has no integer format_version; {REEXPORT}")
    if version > FORMAT_VERSION:
        raise UserError(f"{root} is format version {version}, made by a newer edgevlm; this "
                        f"runtime reads up to version {FORMAT_VERSION}: pip install -U edgevlm")
    chosen, graphs = _graphs(root, m, precision)
    for graph in graphs.values():  # nothing the export names may lead outside it
        check_graph_files(root, graph)
    rope_file = root / m["rope_file"] if m.get("rope_file") else None
    if rope_file is not None:
        check_inside(root, rope_file, "edgevlm.json's rope_file")
    decoder = m.get("decoder") if isinstance(m.get("decoder"), dict) else {}
    config = _json(root / "config.json")
    text: dict[str, Any] = config.get("text_config") or {}
    gen = _json(root / "generation_config.json")
    tok_cfg = _json(root / "tokenizer_config.json")
    tokenizer_file = root / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{root} has no tokenizer.json; {REEXPORT}")
    heads = text.get("num_attention_heads")
    head_dim = _first(m.get("head_dim"), text.get("head_dim"),
                      text["hidden_size"] // heads if heads and "hidden_size" in text else None)
    return ExportInfo(
        root=root, format_version=version, precision=chosen, graphs=graphs,
        num_layers=_first(m.get("num_layers"), text.get("num_hidden_layers")),
        num_kv_heads=_first(m.get("num_kv_heads"), text.get("num_key_value_heads"), heads),
        head_dim=head_dim,
        image_token_id=_first(m.get("image_token_id"), config.get("image_token_index"),
                              config.get("image_token_id")),
        num_image_tokens=_first(m.get("num_image_tokens"), config.get("image_seq_length")),
        eos_token_ids=_ids(_first(m.get("eos_token_id"), gen.get("eos_token_id"),
                                  text.get("eos_token_id"),
                                  _added_token_id(tokenizer_file, tok_cfg.get("eos_token")))),
        max_position_embeddings=_first(m.get("max_position_embeddings"),
                                       text.get("max_position_embeddings")),
        chat_template=_chat_template(root, m, tok_cfg),
        special_tokens=special_tokens_from_config(tok_cfg),
        image_processor=_image_processor(root, m),
        tokenizer_file=tokenizer_file,
        profile=_member(Profile, m.get("profile", "default"), root, "profile"),
        context=_first((m.get("static_shapes") or {}).get("context"),
                       decoder.get("max_context")),
        rope_file=rope_file,
        decoder=_member(DecoderKind, decoder.get("kind", "traced"), root, "decoder.kind"),
        family=m.get("family", "llava"),
        token_select=(m.get("token_select") or {}).get("method"),
        vision_tokens=m.get("vision_tokens"))


def _member(kind, value, root: Path, key: str):
    """edgevlm.json's `key` as a member of the enum `kind`; an export from a newer edgevlm may
    name one this runtime does not know."""
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{root / MANIFEST}: {key} {value!r} is unknown to this runtime (it "
                        f"knows {', '.join(k.value for k in kind)}): pip install -U "
                        "edgevlm") from None


def _added_token_id(tokenizer_file: Path, token) -> int | None:
    """The id of a special token (str or {"content": ...}) in tokenizer.json's added tokens."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        return None
    added = _json(tokenizer_file).get("added_tokens") or []
    return next((t["id"] for t in added if isinstance(t, dict) and t.get("content") == content),
                None)
