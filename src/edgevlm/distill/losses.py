"""LLaVA-KD's distillation losses as pure functions of logits (Cai et al., arXiv:2410.16236).

MDist = response KL + visual KL; RDist = 1 - cosine between the teacher's and the student's
relation matrices R = Z·Zᵀ of the image-token logits. Nothing here knows of models or
trainers: `edgevlm.distill.stages` runs the teacher and hands the logits in.

KL is KL(teacher ‖ student) over the vocabulary, on softmax(z / T), scaled by T² (Hinton et
al.) so gradients keep their size as T changes; at the default T = 1 it is the plain KL.
Memory stays bounded at real sizes (576+ image tokens, 150k vocabulary): the KL runs over row
chunks under activation checkpointing, RDist's Z·Zᵀ over vocabulary chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass(frozen=True)
class LossWeights:
    res: float = 1.0  # response KL
    vis: float = 1.0  # visual KL
    rel: float = 1.0  # RDist
    temperature: float = 1.0
    rel_per_sample: bool = True  # False: one relation matrix over the whole batch (reference)
    vocab_chunk: int = 8192  # RDist vocabulary chunk: memory O(N_img² + N_img·chunk)

    @property
    def uses_teacher(self) -> bool:
        return any(w != 0 for w in (self.res, self.vis, self.rel))


def token_kl(student, teacher, temperature: float = 1.0):
    """KL(teacher ‖ student) per row of (N, V) logits -> (N,), in float32."""
    import torch.nn.functional as F

    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * (t * t)


def mean_kl(student, teacher, temperature: float = 1.0, rows: int = 256):
    """Mean of token_kl over (N, V) rows, `rows` at a time under activation checkpointing, so
    the float32 softmax temporaries of 576+ image tokens × a 150k vocabulary are never all held
    at once (the backward recomputes each chunk)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(s, t):
        return token_kl(s, t, temperature).sum()

    total = 0.0
    for i in range(0, student.shape[0], rows):
        s, t = student[i: i + rows], teacher[i: i + rows]
        total = total + (checkpoint(chunk_sum, s, t, use_reentrant=False)
                         if s.requires_grad else chunk_sum(s, t))
    return total / student.shape[0]


def response_kl(student, teacher, labels, temperature: float = 1.0):
    """Mean KL over the answer tokens: logits (B, S, V) at position i predict labels[i + 1]."""
    mask = labels[:, 1:] != IGNORE  # (B, S-1)
    if not mask.any():
        return student.sum() * 0.0
    return mean_kl(student[:, :-1][mask], teacher[:, :-1][mask], temperature)


def visual_kl(student, teacher, input_ids, image_token_id: int, temperature: float = 1.0):
    """Mean KL over the image-token positions (unshifted: the logits *at* each image token)."""
    mask = input_ids == image_token_id  # (B, S)
    if not mask.any():
        return student.sum() * 0.0
    return mean_kl(student[mask], teacher[mask], temperature)


def relation_matrix(z, chunk: int = 8192):
    """R = Z·Zᵀ for Z (N, V), summed over vocabulary chunks so no (N, V) float32 copy is made
    at once; memory O(N² + N·chunk)."""
    import torch

    r = torch.zeros(z.shape[0], z.shape[0], dtype=torch.float32, device=z.device)
    for i in range(0, z.shape[1], chunk):
        part = z[:, i: i + chunk].float()
        r = r + part @ part.T
    return r


def _relation_distance(zs, zt, chunk: int):
    import torch.nn.functional as F

    rs = relation_matrix(zs, chunk).flatten()
    rt = relation_matrix(zt, chunk).flatten()
    return 1.0 - F.cosine_similarity(rs, rt, dim=0, eps=1e-12)


def relation_loss(student, teacher, input_ids, image_token_id: int, per_sample: bool = True,
                  chunk: int = 8192):
    """RDist: 1 - cos(vec(R_T), vec(R_S)) over the image-token logits.

    per_sample: one N_img × N_img matrix per sample, losses averaged; otherwise all the batch's
    image tokens form one matrix, as the reference implementation does.
    """
    mask = input_ids == image_token_id  # (B, S)
    if not mask.any():
        return student.sum() * 0.0
    if not per_sample:
        return _relation_distance(student[mask], teacher[mask], chunk)
    losses = [_relation_distance(student[b][mask[b]], teacher[b][mask[b]], chunk)
              for b in range(mask.shape[0]) if mask[b].any()]
    return sum(losses) / len(losses)


def distill_terms(ce, student, teacher, batch, image_token_id: int, w: LossWeights):
    """Total = CE + w_res·L_res + w_vis·L_vis + w_rel·L_rel; returns (total, {term: detached}).

    A term whose weight is 0 is not computed (and not shown).
    """
    total, terms = ce, {"ce": ce.detach()}
    ids = batch["input_ids"]
    if w.res:
        res = response_kl(student, teacher, batch["labels"], w.temperature)
        total, terms["res_kl"] = total + w.res * res, res.detach()
    if w.vis:
        vis = visual_kl(student, teacher, ids, image_token_id, w.temperature)
        total, terms["vis_kl"] = total + w.vis * vis, vis.detach()
    if w.rel:
        rel = relation_loss(student, teacher, ids, image_token_id, w.rel_per_sample,
                            w.vocab_chunk)
        total, terms["rdist"] = total + w.rel * rel, rel.detach()
    return total, terms
