"""LLaVA conversation data: reading, checking, and turning samples into training batches.

Format (LLaVA-Pretrain / LLaVA-665k): a JSON list of
  {"id", "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                    {"from": "gpt", "value": "..."}, ...]}
Image paths are relative to the JSON file's folder (or `image_root`) and may not leave it.
An entry without "image" (or with "image": null) is text-only, as LLaVA-665k's ShareGPT
conversations are; it has no `<image>` tag, and a batch may mix both kinds (pixel_values then
holds one row per image sample, None when the batch has none).
Labels cover only the assistant answers (and the end-of-turn token that closes each), so the
loss teaches answering, not repeating the prompt.

Over-long samples (LLaVA's `model_max_length`): `fit_samples` measures every sample once before
training; one longer than max_length is truncated after its image-token run and first prompt
(labels cut at the same place), or skipped when even those do not fit, or in "skip" mode.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from edgevlm.data.samples import IMAGE_TAG, Sample, open_image, to_messages
from edgevlm.errors import UserError

IGNORE = -100

log = logging.getLogger(__name__)


LONG_SAMPLES = ("truncate", "skip")  # what happens to a sample over max_length
DEFAULT_MAX_LENGTH = 1024


def pixel_inputs(processor, samples: list[Sample]) -> dict:
    """The model's pixel inputs for the samples, as their family lays them out: LLaVA
    {pixel_values (N_images, 3, H, W)} for the samples that have an image; Idefics3 5-D tiles
    and pixel_attention_mask, one row per sample. {} when no sample has an image."""
    from edgevlm.families import family_of_processor

    images = [None if s.image is None else open_image(s.image) for s in samples]
    return family_of_processor(processor).pixel_inputs(processor, images)


PASSED_AS_IS = ("pixel_attention_mask", "image_grid_thw", "mm_token_type_ids")


def text_inputs(processor, input_ids) -> dict:
    """What the model's family needs beside the ids (Qwen2-VL: mm_token_type_ids); {}."""
    from edgevlm.families import family_of_processor

    family = family_of_processor(processor)
    return family.text_inputs(processor, input_ids) if family.text_inputs else {}


def pixels_of(batch: dict, dtype) -> dict:
    """The batch's pixel inputs for a model call: pixel_values in the model's dtype (absent for
    a text-only batch); pixel_attention_mask, image_grid_thw and mm_token_type_ids as they
    are."""
    out = {}
    if batch.get("pixel_values") is not None:
        out["pixel_values"] = batch["pixel_values"].to(dtype)
    for key in PASSED_AS_IS:
        if batch.get(key) is not None:
            out[key] = batch[key]
    return out


def expand_images(processor, text: str, n_tokens: int, sample: Sample) -> str:
    """`text` with its `<image>` tag replaced by what the model's family makes of the image."""
    from edgevlm.families import family_of_processor

    if IMAGE_TAG not in text:
        return text
    family = family_of_processor(processor)
    if not family.expansion_needs_image:
        return text.replace(IMAGE_TAG, family.expand_image(processor, n_tokens, None))
    # The tiling depends on the image's size only: read the size from the header (training
    # measures every sample before it starts) and expand once per size.
    from PIL import Image

    try:
        with Image.open(sample.image) as im:
            size = im.size
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {sample.image} ({e}); replace or remove that "
                        "entry") from e
    return text.replace(IMAGE_TAG, _sized_expansion(family.name, processor, n_tokens, size))


@functools.lru_cache(maxsize=512)
def _sized_expansion(family: str, processor, n_tokens: int, size: tuple[int, int]) -> str:
    """What <image> becomes for any image of this (width, height), from a blank one."""
    from PIL import Image

    from edgevlm.families import family_of

    return family_of(family).expand_image(processor, n_tokens, Image.new("RGB", size))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`apply_chat_template(..., tokenize=False)`, a broken or missing template ending in one
    line that names it instead of a jinja or transformers traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"the model's chat template cannot render this conversation "
                        f"({type(e).__name__}: {e}); fix the template in the model folder "
                        "(chat_template.jinja or tokenizer_config.json)") from e


def resolve_max_length(requested: int | None, positions: int | None) -> int:
    """The token limit a run uses: `requested` (--max-length), checked against the model's
    max_position_embeddings; by default the smaller of 1024 and that."""
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions and requested > positions:
        raise UserError(f"--max-length {requested} is more than the model's "
                        f"max_position_embeddings {positions}; give --max-length {positions} "
                        "or less")
    return requested


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    labels: list[int]
    keep: int  # the fewest tokens a truncation may leave: first prompt, image run, one more


class Collator:
    """Samples -> padded batch (input_ids, attention_mask, pixel_values, labels).

    `<image>` is expanded to the model's image-token count, as LlavaProcessor does; labels are
    the token ids inside the assistant answers, IGNORE elsewhere. A sample over max_length is
    cut to it ("truncate", when its `keep` fits) or refused: `fit_samples` sorts those out
    before training, so a refusal here means a caller skipped that step.
    """

    def __init__(self, processor, num_image_tokens: int, max_length: int = DEFAULT_MAX_LENGTH,
                 long_samples: str = "truncate"):
        assert long_samples in LONG_SAMPLES, long_samples
        self.processor = processor
        self.tok = processor.tokenizer
        self.n_img = num_image_tokens
        self.max_length = max_length
        self.long_samples = long_samples

    def encode(self, sample: Sample) -> Encoded:
        """The whole sample's ids and labels, never truncated."""
        spans, text = [], ""
        for k in range(len(sample.turns)):
            msgs = to_messages(sample.turns[: k + 1])
            prompt = render_chat(self.tok, msgs[:-1], add_generation_prompt=True)
            full = render_chat(self.tok, msgs)
            prompt, full = (expand_images(self.processor, s, self.n_img, sample)
                            for s in (prompt, full))
            if not (full.startswith(text) and full.startswith(prompt)):
                raise UserError(f"sample {sample.id}: the model's chat template renders a "
                                "conversation that does not begin with its earlier turns, so "
                                "the answers cannot be told from the prompts; give the model a "
                                "template that appends each turn (tokenizer_config.json or "
                                "chat_template.jinja)")
            # Answer plus its <|im_end|>; the newline after it is not taught.
            spans.append((len(prompt), len(full.rstrip("\n"))))
            text = full
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [t if any(s <= a and b <= e for s, e in spans) else IGNORE
                  for t, (a, b) in zip(ids, offsets)]
        first_prompt = sum(1 for a, _ in offsets if a < spans[0][0])  # tokens before answer 1
        image_end = max((j + 1 for j, (a, b) in enumerate(offsets)
                         if IMAGE_TAG in text[a:b]), default=0)
        return Encoded(ids, labels, max(first_prompt, image_end) + 1)

    def fits(self, enc: Encoded) -> bool:
        """Whether the sample trains under max_length (whole, or truncated)."""
        n = len(enc.ids)
        return n <= self.max_length or (self.long_samples == "truncate"
                                        and enc.keep <= self.max_length)

    def fit(self, sample: Sample) -> tuple[list[int], list[int]]:
        enc = self.encode(sample)
        if not self.fits(enc):
            raise UserError(f"sample {sample.id} is {len(enc.ids)} tokens, over --max-length "
                            f"{self.max_length}, and cannot be truncated (its first prompt with "
                            f"the image needs {enc.keep}); raise --max-length or drop it")
        # Cut after the image run and the first prompt (keep <= max_length): labels stay
        # aligned with ids, so a cut answer teaches its first tokens only.
        return enc.ids[: self.max_length], enc.labels[: self.max_length]

    def __call__(self, samples: list[Sample]) -> dict:
        import torch

        encoded = [self.fit(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        pixels = pixel_inputs(self.processor, samples)
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": None, **pixels,
                **text_inputs(self.processor, input_ids), "labels": labels}


@dataclass
class FitReport:
    """What `fit_samples` did to a data set under one max_length; listed in the run's report."""

    samples: list[Sample]  # those that train, in order
    total: int  # samples given
    text_only: int  # of those that train
    truncated: list[str]  # ids of samples cut to max_length
    skipped: list[str]  # ids of samples left out: too long even when truncated (or "skip")
    longest: int  # tokens of the longest sample, before truncation
    max_length: int
    long_samples: str

    def to_dict(self, ids: int = 100) -> dict:
        return {"samples": self.total, "trained": len(self.samples),
                "text_only": self.text_only, "max_length": self.max_length,
                "long_samples": self.long_samples, "longest": self.longest,
                "truncated": len(self.truncated), "skipped": len(self.skipped),
                "truncated_ids": self.truncated[:ids], "skipped_ids": self.skipped[:ids]}


def fit_samples(samples: list[Sample], collator: Collator, where: str = "the data",
                quiet: bool = True) -> FitReport:
    """Measure every sample under `collator.max_length`: keep, truncate or skip (counted).

    A limit that no sample fits is a UserError naming --max-length and the smallest that works.
    """
    from edgevlm.progress import Progress

    kept, truncated, skipped, need, longest = [], [], [], [], 0
    limit, mode = collator.max_length, collator.long_samples
    with Progress(f"lengths of {where}", len(samples), enabled=not quiet) as bar:
        for s in samples:
            enc = collator.encode(s)
            longest = max(longest, len(enc.ids))
            need.append(len(enc.ids) if mode == "skip" else min(len(enc.ids), enc.keep))
            if not collator.fits(enc):
                skipped.append(s.id)
            else:
                kept.append(s)
                if len(enc.ids) > limit:
                    truncated.append(s.id)
            bar.update(1)
    if not kept:
        what = ("the shortest sample" if mode == "skip" else
                "the shortest first prompt (image tokens included, plus one answer token)")
        raise UserError(f"--max-length {limit} is too small for every sample of {where}: "
                        f"{what} needs {min(need)} tokens; give --max-length {min(need)} or "
                        f"more (all {len(samples)} fit whole at {longest})")
    if skipped:
        log.warning("%s: %d of %d samples are over --max-length %d and were skipped (%s); "
                    "raise --max-length to keep them", where, len(skipped), len(samples), limit,
                    "--long-samples skip" if mode == "skip" else "even their first prompt "
                    "is too long")
    if truncated:
        log.info("%s: %d samples truncated to --max-length %d", where, len(truncated), limit)
    return FitReport(kept, len(samples), sum(s.image is None for s in kept), truncated,
                     skipped, longest, limit, mode)
