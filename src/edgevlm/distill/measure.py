"""How close a student is to its teacher: response KL on held-out samples.

The same KL(teacher ‖ student) the DFT stage minimises, on answer tokens, weighted by token
(not by batch), so it is comparable across batch sizes.
"""

from __future__ import annotations

from edgevlm.data import Collator, Sample
from edgevlm.distill.losses import IGNORE, token_kl
from edgevlm.models import LoadedModel


def teacher_kl(student: LoadedModel, teacher: LoadedModel, samples: list[Sample],
               batch_size: int = 16, temperature: float = 1.0) -> float:
    """Mean KL(teacher ‖ student) per answer token over `samples` (teacher-forced)."""
    import torch

    collate = Collator(student.processor, student.num_image_tokens)
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i: i + batch_size])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            s = student.model(**inputs).logits.float()
            t = teacher.model(**inputs).logits.float()
        mask = batch["labels"][:, 1:] != IGNORE
        kl = token_kl(s[:, :-1][mask], t[:, :-1][mask], temperature)
        total, count = total + float(kl.sum()), count + int(mask.sum())
    return total / max(count, 1)
