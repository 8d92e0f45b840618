"""Preference distillation (LLaVA-MoD's second phase): pairs, batches and the DPO losses.

A pair is one image question with a chosen and a rejected answer. LLaVA-MoD takes its pairs
from RLAIF-V; without it, `build_pairs` makes them from the instruction data itself:
- chosen: the data's reference answer;
- rejected: the student's own greedy answer when it is wrong; when the student is right, a
  hallucination made from the data: a yes/no answer flipped (asserting an object that is not
  there, or denying one that is, the error POPE measures), else another answer the data gives
  to questions of the same type (a colour, shape or count that is not the one in the image).
`read_pairs` reads RLAIF-V's layout instead: a JSON list of {"image", "question", "chosen",
"rejected"} ("image" relative to the file or --image-root, and, as in LLaVA data, not leaving
that folder: edgevlm.data.samples' rule, symlinks resolved).

The loss compares the policy's (the student's) summed response log-probabilities on chosen and
rejected with the reference model's (the dense teacher's), β = 0.1:
- sigmoid (standard DPO, Rafailov et al.): -log σ(β[(π_c - ref_c) - (π_r - ref_r)]);
- kto_pair (the loss in LLaVA-MoD's script, as TRL defined it): 1 - σ(β(Δ_c - KL_r)) and
  1 - σ(β(KL_c - Δ_r)) over the pair, with KL_* the batch mean of Δ_* clamped at 0.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from edgevlm.data import IMAGE_TAG, Sample
from edgevlm.data.samples import image_path
from edgevlm.distill.losses import IGNORE
from edgevlm.errors import UserError

PREF_LOSSES = ("sigmoid", "kto_pair")
YES_NO = {"yes": "no", "no": "yes"}


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path | None
    question: str  # holds <image> when there is an image
    chosen: str
    rejected: str
    source: str  # "student" (its own wrong answer), "flip", "swap", or "file"

    def sample(self, which: str) -> Sample:
        answer = self.chosen if which == "chosen" else self.rejected
        return Sample(f"{self.id}:{which}", self.image, ((self.question, answer),), "pref")


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def build_pairs(student, samples: list[Sample], seed: int = 0, max_new_tokens: int = 16,
                batch_size: int = 16, quiet: bool = True) -> tuple[list[Pair], dict]:
    """Pairs from single-turn samples and the student's greedy answers; returns (pairs, counts
    by source, plus "dropped": samples with no wrong answer to offer)."""
    from edgevlm.evaluate import evaluate

    single = [s for s in samples if len(s.turns) == 1]
    if not single:
        raise UserError("preference pairs are built from single-turn question/answer samples, "
                        "and --data has none; give --pref-data PAIRS.json in RLAIF-V's layout")
    answers = defaultdict(list)
    for s in single:
        if _norm(s.answer) not in [_norm(a) for a in answers[s.type]]:
            answers[s.type].append(s.answer)
    preds = evaluate(student, single, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     quiet=quiet).predictions
    rng = random.Random(seed)
    pairs, counts = [], {"student": 0, "flip": 0, "swap": 0, "dropped": 0}
    for s, p in zip(single, preds):
        if not p.correct and _norm(p.prediction) and _norm(p.prediction) != _norm(s.answer):
            rejected, source = p.prediction.strip(), "student"
        elif _norm(s.answer) in YES_NO:
            rejected, source = YES_NO[_norm(s.answer)], "flip"
        else:
            others = [a for a in answers[s.type] if _norm(a) != _norm(s.answer)]
            if not others:
                counts["dropped"] += 1
                continue
            rejected, source = rng.choice(others), "swap"
        counts[source] += 1
        pairs.append(Pair(s.id, s.image, s.question, s.answer, rejected, source))
    if not pairs:
        raise UserError("no preference pair could be made from --data: every question has a "
                        "single possible answer; give --pref-data PAIRS.json")
    return pairs, counts


def read_pairs(path, image_root=None) -> list[Pair]:
    """RLAIF-V's layout: [{"image": ..., "question": ..., "chosen": ..., "rejected": ...}].

    Every entry is checked here, its image inside the file's folder (or `image_root`) and an
    image file, so a bad pairs file is refused before the first stage trains, not at the last.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference data {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: preference data must be a non-empty JSON list of "
                        '{"image", "question", "chosen", "rejected"} objects')
    if image_root is not None and not Path(image_root).is_dir():
        raise UserError(f"--image-root {image_root} is not a folder; give the folder the "
                        f"image paths in {path} are relative to")
    root = Path(image_root or path.parent).resolve()
    pairs = []
    for i, e in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(e, dict):
            raise UserError(f"{where}: expected an object with question, chosen and rejected")
        for key in ("question", "chosen", "rejected"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise UserError(f"{where}: {key!r} is missing or not a non-empty string")
        if _norm(e["chosen"]) == _norm(e["rejected"]):
            raise UserError(f"{where}: the chosen and rejected answers are the same "
                            f"({e['chosen']!r}), so the pair teaches nothing; fix or drop it")
        question = e["question"]
        image = _pair_image(e, where, root)
        if image is not None:
            if IMAGE_TAG not in question:
                question = f"{IMAGE_TAG}\n{question}"
        elif IMAGE_TAG in question:
            raise UserError(f"{where}: the question has {IMAGE_TAG} but no 'image' is given")
        pairs.append(Pair(str(e.get("id", e.get("idx", i))), image, question, e["chosen"],
                          e["rejected"], "file"))
    return pairs


def _pair_image(entry: dict, where: str, root: Path) -> Path | None:
    """The entry's image ("image", or RLAIF-V's "image_path"; None: text-only), by LLaVA data's
    rule: relative to `root`, resolved (symlinks too) and inside it; and an image PIL knows by
    its header (the pixels are decoded as the pairs train; a header keeps a pairs file of any
    size quick to check)."""
    from PIL import Image, UnidentifiedImageError

    rel = entry.get("image")
    if rel is None:
        rel = entry.get("image_path")
    path = image_path({"image": rel}, where, root)
    if path is None:
        return None
    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise UserError(f"{where}: cannot read image {path} ({e}); replace or remove that "
                        "pair") from e
    return path


class PairCollator:
    """Pairs -> one batch of 2B rows: the B chosen samples, then the B rejected ones (each
    pair's two rows share its prompt and image)."""

    def __init__(self, collator):
        self.collator = collator
        self.max_length = collator.max_length

    def __call__(self, pairs: list[Pair]) -> dict:
        return self.collator([p.sample("chosen") for p in pairs]
                             + [p.sample("rejected") for p in pairs])


def fit_pairs(pairs: list[Pair], collator, where: str, quiet: bool = True):
    """fit_samples for pairs: a pair trains when both its rows fit (truncated or whole)."""
    from edgevlm.data import fit_samples

    flat = [s for p in pairs for s in (p.sample("chosen"), p.sample("rejected"))]
    report = fit_samples(flat, collator, where, quiet)
    kept = {s.id for s in report.samples}
    report.samples = [p for p in pairs
                      if f"{p.id}:chosen" in kept and f"{p.id}:rejected" in kept]
    if not report.samples:
        raise UserError(f"{where}: no pair fits --max-length {collator.max_length}; raise it")
    return report


def sequence_logps(logits, labels):
    """Summed log-probabilities of the label tokens of each row: logits (N, S, V) at position i
    predict labels[i + 1]; -> (N,)."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)


def preference_loss(policy_c, policy_r, ref_c, ref_r, beta: float = 0.1, kind: str = "sigmoid"):
    """Mean loss over the pairs and the (detached) reward margin."""
    import torch
    import torch.nn.functional as F

    dc, dr = policy_c - ref_c, policy_r - ref_r
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (dc - dr))
    elif kind == "kto_pair":
        kl_c = dc.mean().clamp(min=0).detach()
        kl_r = dr.mean().clamp(min=0).detach()
        losses = torch.cat([1 - torch.sigmoid(beta * (dc - kl_r)),
                            1 - torch.sigmoid(beta * (kl_c - dr))])
    else:
        raise UserError(f"preference loss {kind!r} is not one of {', '.join(PREF_LOSSES)}")
    return losses.mean(), (beta * (dc - dr)).detach().mean()


class PreferenceLoss:
    """loss_fn for train.run on PairCollator batches: the policy is the model being trained, the
    reference a frozen model (LLaVA-MoD: the dense teacher)."""

    def __init__(self, reference, beta: float = 0.1, kind: str = "sigmoid"):
        if kind not in PREF_LOSSES:
            raise UserError(f"--pref-loss {kind!r} is not one of {', '.join(PREF_LOSSES)}")
        if not beta > 0:
            raise UserError(f"--beta must be positive, got {beta}")
        self.reference, self.beta, self.kind = reference, beta, kind

    def __call__(self, model, batch):
        from edgevlm.distill.stages import frozen_logits

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logps = sequence_logps(model(**inputs).logits, batch["labels"])
        ref = sequence_logps(frozen_logits(self.reference, batch), batch["labels"])
        b = logps.shape[0] // 2
        loss, margin = preference_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.beta,
                                       self.kind)
        won = (logps[:b] - ref[:b] > logps[b:] - ref[b:]).float().mean()
        return loss, {"pref": loss.detach(), "margin": margin, "won": won}
