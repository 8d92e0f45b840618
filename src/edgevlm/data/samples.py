"""Reading LLaVA conversation data (LLaVA-Pretrain / LLaVA-665k), with the standard library and
pillow only: the runtime's benchmark (edgevlm.bench.harness) reads eval sets with it on devices
without torch, and the toolkit (edgevlm.data) builds its batches on it.

Format: a JSON list of
  {"id", "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                    {"from": "gpt", "value": "..."}, ...]}
Image paths are relative to the JSON file's folder (or `image_root`) and may not leave it.
An entry without "image" (or with "image": null) is text-only, as LLaVA-665k's ShareGPT
conversations are; it has no `<image>` tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path | None  # None: a text-only conversation (no <image> tag)
    turns: tuple[tuple[str, str], ...]  # (question, answer); the first question holds <image>
    type: str

    @property
    def question(self) -> str:
        return self.turns[-1][0]

    @property
    def answer(self) -> str:
        return self.turns[-1][1]


def load_samples(json_path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Read and check a LLaVA-format file; every problem names the entry index and the fix."""
    path = Path(json_path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); it must be a list of LLaVA "
                        "conversation entries") from e
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of entries, found {type(rows).__name__}")
    if not rows:
        raise UserError(f"{path} holds no entries; give a data set with at least one sample")
    if image_root is not None and not Path(image_root).is_dir():
        raise UserError(f"--image-root {image_root} is not a folder; give the folder the "
                        f"image paths in {path} are relative to")
    root = Path(image_root or path.parent).resolve()
    return [_parse(row, i, path, root) for i, row in enumerate(rows)]


def image_path(row: dict, where: str, root: Path) -> Path | None:
    """The entry's image file, or None for a text-only entry (no "image", or null); inside
    `root` once symlinks are resolved, or one line."""
    rel = row.get("image")
    if rel is None:
        return None
    if isinstance(rel, list):
        raise UserError(f"{where}: 'image' lists {len(rel)} images; edgevlm's LLaVA models "
                        "take one image per conversation: give one path, or null for text-only")
    if not isinstance(rel, str) or not rel.strip():
        raise UserError(f"{where}: 'image' is {rel!r}; give a relative image path, or null "
                        "(or no 'image' key) for a text-only conversation")
    if "://" in rel:
        raise UserError(f"{where}: 'image' is a URL ({rel}); edgevlm reads local files only "
                        "and never downloads: save the image and give its path")
    try:
        image = (root / rel).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop, ...
        raise UserError(f"{where}: image path {rel!r} cannot be resolved ({e}); fix it") from e
    if not image.is_relative_to(root):
        raise UserError(f"{where}: image path {rel!r} leaves the data folder {root}; "
                        "keep images inside it or pass --image-root")
    if not image.is_file():
        raise UserError(f"{where}: image {image} does not exist; fix the path, or pass "
                        "--image-root with the folder the image paths are relative to")
    return image


def _parse(row, i: int, path: Path, root: Path) -> Sample:
    where = f"{path} entry {i}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: must be an object with 'conversations' (and 'image')")
    conv = row.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise UserError(f"{where}: 'conversations' must be a list of human/gpt turns")
    image = image_path(row, where, root)
    turns, n_tags = [], 0
    for k in range(0, len(conv) - 1, 2):
        q, a = conv[k], conv[k + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)
                and ROLES.get(q.get("from")) == "user"
                and ROLES.get(a.get("from")) == "assistant"):
            raise UserError(f"{where}: turns {k} and {k + 1} must be a human then a gpt "
                            "message with 'from' and 'value'")
        for turn, role in ((q, "human"), (a, "gpt")):
            if not isinstance(turn.get("value"), str):
                raise UserError(f"{where}: the {role} turn's 'value' is "
                                f"{json.dumps(turn.get('value'))}; give the message's text "
                                "as a string")
        qv, av = q["value"], a["value"]
        n_tags += qv.count(IMAGE_TAG) + av.count(IMAGE_TAG)
        turns.append((qv, av))
    if image is None and n_tags:
        said = "'image' is null" if "image" in row else "there is no 'image'"
        raise UserError(f"{where}: has {n_tags} '<image>' tag(s) but {said}; add the image "
                        "path, or remove the tag for a text-only conversation")
    if image is not None and n_tags != 1:
        raise UserError(f"{where}: has {n_tags} '<image>' tags; a conversation with an image "
                        "needs exactly one, in the first human turn")
    return Sample(str(row.get("id", i)), image, tuple(turns), str(row.get("type", "all")))


def open_image(path: Path):
    """PIL RGB image, or a UserError that names the file. Transparency is composited onto
    white, as the HF image processors and the runtime do (runtime.preprocess.to_rgb), so what
    training and evaluation see is what the runtime sees."""
    from PIL import Image, UnidentifiedImageError

    from edgevlm.runtime.preprocess import to_rgb

    try:
        with Image.open(path) as im:
            im.load()
            return Image.fromarray(to_rgb(im))
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is too large to decode safely ({e}); downscale it or "
                        "remove that entry") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path} ({e}); replace or remove that entry") from e


def to_messages(turns, with_last_answer: bool = True) -> list[dict]:
    """Chat-template messages for a sample's turns."""
    msgs = []
    for k, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": q})
        if with_last_answer or k < len(turns) - 1:
            msgs.append({"role": "assistant", "content": a})
    return msgs
