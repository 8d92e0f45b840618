"""LLaVA conversation data: reading, checking, and turning samples into training batches.

Format (LLaVA-Pretrain / LLaVA-665k): a JSON list of
  {"id", "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                    {"from": "gpt", "value": "..."}, ...]}
Image paths are relative to the JSON file's folder (or `image_root`) and may not leave it.
Labels cover only the assistant answers (and the end-of-turn token that closes each), so the
loss teaches answering, not repeating the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE = -100


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
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
    root = Path(image_root or path.parent).resolve()
    return [_parse(row, i, path, root) for i, row in enumerate(rows)]


def _parse(row, i: int, path: Path, root: Path) -> Sample:
    where = f"{path} entry {i}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: must be an object with 'image' and 'conversations'")
    conv = row.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise UserError(f"{where}: 'conversations' must be a list of human/gpt turns")
    if "image" not in row:
        raise UserError(f"{where}: has no 'image'; every entry needs an image path")
    image = (root / str(row["image"])).resolve()
    if not image.is_relative_to(root):
        raise UserError(f"{where}: image path {row['image']!r} leaves the data folder {root}; "
                        "keep images inside it or pass --image-root")
    if not image.is_file():
        raise UserError(f"{where}: image {image} does not exist")
    turns, n_tags = [], 0
    for k in range(0, len(conv) - 1, 2):
        q, a = conv[k], conv[k + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)
                and ROLES.get(q.get("from")) == "user"
                and ROLES.get(a.get("from")) == "assistant"):
            raise UserError(f"{where}: turns {k} and {k + 1} must be a human then a gpt "
                            "message with 'from' and 'value'")
        qv, av = str(q.get("value", "")), str(a.get("value", ""))
        n_tags += qv.count(IMAGE_TAG) + av.count(IMAGE_TAG)
        turns.append((qv, av))
    if n_tags != 1:
        raise UserError(f"{where}: has {n_tags} '<image>' tags; a conversation needs exactly "
                        "one, in the first human turn")
    return Sample(str(row.get("id", i)), image, tuple(turns), str(row.get("type", "all")))


def open_image(path: Path):
    """PIL RGB image, or a UserError that names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path} ({e}); replace or remove that entry") from e


def to_messages(turns, with_last_answer: bool = True) -> list[dict]:
    """Chat-template messages for a sample's turns."""
    msgs = []
    for k, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": q})
        if with_last_answer or k < len(turns) - 1:
            msgs.append({"role": "assistant", "content": a})
    return msgs


class Collator:
    """Samples -> padded batch (input_ids, attention_mask, pixel_values, labels).

    `<image>` is expanded to the model's image-token count, as LlavaProcessor does; labels are
    the token ids inside the assistant answers, IGNORE elsewhere.
    """

    def __init__(self, processor, num_image_tokens: int, max_length: int = 1024):
        self.tok = processor.tokenizer
        self.image_processor = processor.image_processor
        self.n_img = num_image_tokens
        self.max_length = max_length

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        render = self.tok.apply_chat_template
        expand = IMAGE_TAG * self.n_img
        spans, text = [], ""
        for k in range(len(sample.turns)):
            msgs = to_messages(sample.turns[: k + 1])
            prompt = render(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = render(msgs, tokenize=False)
            prompt, full = (s.replace(IMAGE_TAG, expand) for s in (prompt, full))
            assert full.startswith(text) and full.startswith(prompt), "template is not a prefix"
            # Answer plus its <|im_end|>; the newline after it is not taught.
            spans.append((len(prompt), len(full.rstrip("\n"))))
            text = full
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(s <= a and b <= e for s, e in spans) else IGNORE
                  for t, (a, b) in zip(ids, enc["offset_mapping"])]
        if len(ids) > self.max_length:
            raise UserError(f"sample {sample.id} is {len(ids)} tokens, over the limit "
                            f"{self.max_length}; shorten it or raise --max-length")
        return ids, labels

    def __call__(self, samples: list[Sample]) -> dict:
        import torch

        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        images = [open_image(s.image) for s in samples]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels,
                "labels": labels}
