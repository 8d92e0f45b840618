"""Q-VLM (Wang et al., NeurIPS 2024, "Q-VLM: Post-training Quantization for Large
Vision-Language Models"), built from the paper's method; the authors' code does not implement it.

Choices made here, each one a place where the paper leaves room:

1. Entropy. The entropy of a layer's input is the Shannon entropy of a 256-bin histogram of the
   hidden-state values of each calibration sample's real tokens, averaged over samples
   (`calibrate.entropy`), measured in the float model (`Calibration.input_entropy`).
2. Partition (`partition`). A cut before layer j costs the entropy of layer j's input: low entropy
   means little information crosses that boundary, the proxy for weak cross-layer dependency.
   Blocks hold at most `max_block` layers; among partitions with the fewest blocks (search cost is
   bounded by the largest block, quality improves with fewer cuts) we take the one whose cuts
   have the lowest total entropy — an exact dynamic program over the L layers.
   `partition="uniform"` (`--partition uniform`, for the ablation) keeps the same number of
   blocks but makes them equal in size (sizes differ by at most one, larger blocks first), so
   the entropy-chosen cuts can be compared with cuts that ignore entropy. The report records
   which partition was used under "partition".
3. Block search (`search_block`). Inputs are the hidden states produced by the already-quantized
   previous blocks; the target is the float block applied to those same inputs (the block is
   asked to reproduce its own float function, as in GPTQ and BRECQ, not to undo earlier error).
   Inside the block, layers are quantized in order with GPTQ error feedback, each layer's
   Hessians taken from inputs that went through the block's already-quantized layers. The
   searched parameters are per-group clipping scales: for each Linear a per-(row, group) ratio
   α* from `clip_grid` minimising the group's Hessian-weighted error eᵀ H_gg e, and one
   strength β per block, clip = 1 − β(1 − α*), chosen from `clip_strengths` jointly for the
   whole block by the block's output error ‖Y_q − Y_fp‖² / ‖Y_fp‖² on held-out calibration
   batches (Calibration.heldout, a quarter of the samples), each candidate fitted on up to
   SEARCH_BATCHES fitting batches; the chosen β is then refitted on every batch. β = 0 is
   plain GPTQ.
4. Vision-side optimization (`optimize_vision`; off by default, `--vision-opt`). After the
   decoder is quantized, the projector and the vision tower's final norms are trained on
   loss = KL(p_fp ‖ p_q) over answer tokens + λ·H_rel(visual tokens), p_q being the quantized
   model that will ship and p_fp the float model's answers taken before the search
   (`vision_reference`): the paper's aims, visual tokens of low entropy that the quantized
   decoder reads as the float one does. H_rel = mean_f ½·log(var_f) − ½·log(mean_f var_f) is a
   differentiable, scale-free stand-in for the histogram entropy of the tokens entering the
   language model (an earlier version without the second term shrank every feature and cost
   ~5 points). Adam step sizes VISION_LRS, checkpoints at a quarter, half and all of
   `vision_opt_steps`; the checkpoint with the lowest KL on held-out batches is kept, the
   untouched start included. These float parameters are saved in the checkpoint. The first
   version ran before the search against the decoder rounded to nearest (a stand-in for the
   searched decoder, which did not exist yet); on SmolLM2 and the shapes teacher it lowered
   its own held-out KL but not the final model's KL or accuracy on eval questions
   (docs/results/quant-smollm2.md), because the rounded decoder errs far more than the
   searched one. After the search it keeps no steps on the teacher and a CLIP + Llama model,
   and on the SmolLM2 LLaVA lowers the eval KL to FP 2.7x at 2.7 points of accuracy; still off
   by default.
5. The GPTQ guard (edgevlm.quant.blocks.GptqGuard): blocks are judged one at a time, so after the
   search the whole model is compared with GPTQ (β = 0 everywhere) by KL(p_fp ‖ p_q) over the
   held-out batches' answer tokens, and the lower one is kept.
6. Decisions are data: `BlockDecision` holds the block, β, the per-Linear clip scales, the
   candidates' errors and the resulting integers; `apply_decision` writes them into the model.
7. Activation quantization (act_bits 8/6/4) is the same for every method (edgevlm.quant.act): the
   β search above sees float activations inside the block; the activation clipping is searched
   after it, layer by layer, against the float layer's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgevlm.data import pixels_of
from edgevlm.errors import UserError
from edgevlm.families import part
from edgevlm.quant import gptq
from edgevlm.quant.calibrate import (
    Calibration,
    check_finite,
    decoder_layers,
    entropy,
    layer_forward,
    layer_prefix,
    layer_stats,
    linears,
    no_tokens_fallback,
    relative_error,
)
from edgevlm.quant.primitives import (
    QuantConfig,
    QuantizedWeight,
    choose_qparams,
    fake_quantize,
    n_groups,
)

ENTROPY_WEIGHT = 0.1  # λ in the vision-side loss
VISION_LRS = (1e-4, 1e-3)  # Adam step sizes the vision-side step tries
VISION_BATCHES = 4  # at most this many fitting and held-out batches for the vision-side step
SEARCH_BATCHES = 2  # at most this many fitting and held-out batches score each block's β


def partition(input_entropy: list[float], max_block: int) -> list[list[int]]:
    """Decoder layers -> consecutive blocks of at most `max_block`, cut at low entropy."""
    n = len(input_entropy)
    best: list[tuple[int, float, int]] = [(0, 0.0, -1)] + [(n + 1, 0.0, -1)] * n
    for j in range(1, n + 1):
        for i in range(max(0, j - max_block), j):
            cost = best[i][1] + (input_entropy[i] if i > 0 else 0.0)
            cand = (best[i][0] + 1, cost, i)
            if cand[:2] < best[j][:2]:
                best[j] = cand
    blocks, j = [], n
    while j > 0:
        i = best[j][2]
        blocks.append(list(range(i, j)))
        j = i
    return blocks[::-1]


def uniform(n_layers: int, n_blocks: int) -> list[list[int]]:
    """`n_layers` consecutive layers in `n_blocks` blocks of equal size (±1, larger first)."""
    assert 1 <= n_blocks <= n_layers, f"{n_blocks} blocks for {n_layers} layers"
    size, extra = divmod(n_layers, n_blocks)
    out, start = [], 0
    for b in range(n_blocks):
        stop = start + size + (b < extra)
        out.append(list(range(start, stop)))
        start = stop
    return out


def blocks(input_entropy: list[float], max_block: int, how: str = "entropy") -> list[list[int]]:
    """The blocks the search walks: entropy cuts, or uniform ones of the same count."""
    chosen = partition(input_entropy, max_block)
    if how == "uniform":
        return uniform(len(input_entropy), len(chosen))
    assert how == "entropy", f"unknown partition {how!r}"
    return chosen


def group_clip(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Per (row, group) clip ratio from cfg.qvlm.clip_grid minimising e_g H_gg e_gᵀ; (N, G).

    A ragged last group (K mod gs columns) is scored on its own columns: the error and H are
    padded with zeros to whole groups, so the padding adds nothing to eᵀHe."""
    n, k = W.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    G = n_groups(k, gs)
    pad = G * gs - k
    Hp = F.pad(H.to(W.device, torch.float32), (0, pad, 0, pad))
    Hg = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])
    best_err = torch.full((n, G), float("inf"), device=W.device)
    best = torch.ones((n, G), device=W.device)
    for a in cfg.qvlm.clip_grid:
        D = (W - fake_quantize(W, choose_qparams(W, cfg.bits, gs, cfg.symmetric, a,
                                                 cfg.signed)))
        D = F.pad(D, (0, pad)).reshape(n, G, gs)
        err = torch.einsum("ngi,gij,ngj->ng", D, Hg, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, a), best)
    return best


@dataclass
class BlockDecision:
    layers: list[int]
    beta: float
    clip: dict[str, torch.Tensor]  # Linear name -> (N, G) clip scales
    candidate_errors: dict[float, float]  # β -> block relative output error
    weights: dict[str, QuantizedWeight] = field(repr=False, default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)  # on every batch

    @property
    def error(self) -> float:
        return self.candidate_errors[self.beta]


def _quantize_block(layers, block: list[int], targets: dict, fp: dict, xs, calib: Calibration,
                    idx: list[int], beta: float, cfg: QuantConfig, records: bool):
    """GPTQ with clip strength β over the block's layers in order, Hessians from the batches
    `idx` (each layer's taken after the block's earlier layers are quantized). Leaves the
    quantized weights in the model; returns (weights, clips, records)."""
    h = [xs[b] for b in idx]
    weights, clips, recs = {}, {}, {}
    for i in block:
        kws, masks = [calib.layer_kwargs[i][b] for b in idx], [calib.masks[b] for b in idx]
        stats, _ = layer_stats(layers[i], h, kws, masks, targets[i], with_entropy=records)
        for name, m in targets[i].items():
            W, H, extra = fp[name].float(), stats[name].hessian, {}
            lcfg = cfg.for_layer(name)
            fallback = no_tokens_fallback(stats[name], W, lcfg)
            if fallback is not None:
                (qw, H, extra), clip = fallback, torch.ones(1)
            else:
                check_finite(name, W, H)
                clip = 1 - beta * (1 - group_clip(W, H, lcfg))
                qw = gptq.quantize_weight(W, H, lcfg, clip)
            deq = qw.dequantize()
            check_finite(name, deq)
            m.weight.data = deq.to(m.weight.dtype)
            weights[name], clips[name] = qw, clip
            if records:
                recs[name] = {"entropy": stats[name].entropy,
                              "error": relative_error(W, deq, H), **extra}
        h = layer_forward(layers[i], h, kws)
    check_finite(f"decoder layers {block}", *h)
    return weights, clips, recs, h


def _block_error(layers, block: list[int], xs, calib: Calibration, idx: list[int],
                 ys: list[torch.Tensor]) -> float:
    """‖Y_q − Y_fp‖ / ‖Y_fp‖ of the block's current weights on the batches `idx`."""
    h = [xs[b] for b in idx]
    for i in block:
        h = layer_forward(layers[i], h, [calib.layer_kwargs[i][b] for b in idx])
    norm = sum(float(y.double().pow(2).sum()) for y in ys)
    err = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(h, ys))
    return (err / max(norm, 1e-30)) ** 0.5


def search_block(model, block: list[int], xs: list[torch.Tensor], calib: Calibration,
                 cfg: QuantConfig) -> BlockDecision:
    """Search β (and so every Linear's clip scales) for one block; the model is left float.

    Each β is fitted on up to SEARCH_BATCHES of the fitting batches and judged on up to
    SEARCH_BATCHES held-out ones (calib.heldout, the last batches); the chosen β is then
    fitted on every batch, so β = 0 gives exactly GPTQ's integers."""
    layers = decoder_layers(model)
    targets = {i: linears(layers[i], layer_prefix(model, i), cfg.skip) for i in block}
    fp = {n: m.weight.detach().clone() for t in targets.values() for n, m in t.items()}

    def restore():
        for name, m in ((n, m) for t in targets.values() for n, m in t.items()):
            m.weight.data = fp[name].clone()

    n = len(xs)
    every = list(range(n))
    held = every[n - calib.heldout:] if 0 < calib.heldout < n else every
    fit = every[: n - calib.heldout] if 0 < calib.heldout < n else every
    fit, held = fit[:SEARCH_BATCHES], held[:SEARCH_BATCHES]
    errors: dict[float, float] = {}
    if len(cfg.qvlm.clip_strengths) > 1:
        ys = [xs[b] for b in held]
        for i in block:
            ys = layer_forward(layers[i], ys, [calib.layer_kwargs[i][b] for b in held])
        for beta in cfg.qvlm.clip_strengths:
            _quantize_block(layers, block, targets, fp, xs, calib, fit, beta, cfg, False)
            errors[beta] = _block_error(layers, block, xs, calib, held, ys)
            restore()
    beta = min(errors, key=errors.get) if errors else cfg.qvlm.clip_strengths[0]
    weights, clips, records, outputs = _quantize_block(layers, block, targets, fp, xs, calib,
                                                       every, beta, cfg, True)
    restore()
    return BlockDecision(list(block), beta, clips, errors or {beta: float("nan")}, weights,
                         records, outputs)


def apply_decision(model, decision: BlockDecision) -> None:
    """Write a block's searched integers into the model (as their exact float values)."""
    modules = dict(model.named_modules())
    for name, qw in decision.weights.items():
        m = modules[name]
        m.weight.data = qw.dequantize().to(m.weight.dtype)


def _answer_logp(model, batch: dict, store: dict) -> torch.Tensor:
    """Log-probabilities the model gives at the positions that predict an answer token
    (labels shifted by one), (T, V); the visual tokens of the pass go to store["tokens"]. The
    LM head runs on those positions only: over every position of an image prompt it would
    allocate B·S·V floats (8 × 250 × 49k for SmolLM2, 400 MB) per pass."""
    def hook(module, args, out):
        store["tokens"] = out
    handle = part(model, "connector").register_forward_hook(hook)
    try:
        hidden = part(model, "backbone")(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            **pixels_of(batch, model.dtype), use_cache=False
        ).last_hidden_state
    finally:
        handle.remove()
    sel = batch["labels"][:, 1:] != -100
    return torch.log_softmax(part(model, "lm_head")(hidden[:, :-1][sel]).float(), -1)


def _kl(model, batch, ref, store) -> torch.Tensor:
    """KL(p_fp ‖ p) per answer token, for the current parameters."""
    return F.kl_div(_answer_logp(model, batch, store), ref, log_target=True,
                    reduction="batchmean")


def _h_rel(tokens: torch.Tensor) -> torch.Tensor:
    """½·mean_f log var_f − ½·log mean_f var_f of the visual tokens: a differentiable,
    scale-free stand-in for their histogram entropy (≤ 0; lower when the features' variances
    are uneven)."""
    var = tokens.reshape(-1, tokens.shape[-1]).float().var(0) + 1e-8
    return 0.5 * (torch.log(var).mean() - torch.log(var.mean()))


@dataclass
class VisionReference:
    """What the vision-side step compares against, taken from the float model before its decoder
    is quantized: the fitting and held-out batches and the float answer log-probs on each."""

    fit: list[dict]
    held: list[dict]
    fit_logp: list[torch.Tensor]  # (T, V) per batch
    held_logp: list[torch.Tensor]


def vision_reference(model, batches: list[dict], heldout: int) -> VisionReference:
    """The float model's answers on up to VISION_BATCHES image batches to fit on and as many
    held-out batches (the last `heldout`)."""
    n = len(batches)
    if not 0 < heldout < n:
        raise UserError(f"the vision-side step needs held-out calibration batches: {n} batch(es), "
                        f"{heldout} held out; pass more --calib-samples or --no-vision-opt")
    with_images = [b for b in batches[: n - heldout] if b.get("pixel_values") is not None]
    fit, held = with_images[:VISION_BATCHES], batches[n - heldout:][:VISION_BATCHES]
    store: dict = {}
    with torch.no_grad():
        return VisionReference(fit, held, [_answer_logp(model, b, store) for b in fit],
                               [_answer_logp(model, b, store) for b in held])


def optimize_vision(model, ref: VisionReference, cfg: QuantConfig) -> dict:
    """Tune the projector and the tower's final norms so that the quantized model answers like
    the float one, with lower visual-token entropy; keep what held-out data confirms.

    Runs after the decoder is quantized (searched, guarded, and the tower rounded if asked), so
    p_q is the model that will ship. Loss on the fitting batches: KL(p_fp ‖ p_q) over answer
    tokens + λ·H_rel(visual tokens), p_fp from `ref`. For each learning rate in VISION_LRS the
    parameters are checkpointed at a quarter, half and all of `vision_opt_steps` and scored by
    the same KL on the held-out batches; the best checkpoint is kept, and the starting point is
    a candidate, so the step never makes the held-out KL worse than leaving the vision side
    alone."""
    params = list(part(model, "connector").parameters())
    params += [p for name, p in part(model, "vision_tower").named_parameters()
               if "post_layernorm" in name or "head.layernorm" in name]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    trainable = {id(p) for p in params}
    store: dict = {}
    start = [p.detach().clone() for p in params]

    def held_out() -> tuple[float, float]:
        """(mean KL to the float model, mean histogram entropy of the visual tokens)."""
        with torch.no_grad():
            kls, ents = [], []
            for b, r in zip(ref.held, ref.held_logp):
                kls.append(float(_kl(model, b, r, store)))
                ents.append(entropy(store["tokens"]))
        return sum(kls) / len(kls), sum(ents) / len(ents)

    steps = cfg.qvlm.vision_opt_steps
    checkpoints = sorted({s for s in (steps // 4, steps // 2, steps) if s > 0})
    best = (float("inf"), 0, None, start, float("nan"))  # (KL, steps, lr, params, entropy)
    try:
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        kl0, ent0 = held_out()
        best = (kl0, 0, None, start, ent0)
        candidates = {}
        for lr in VISION_LRS:
            with torch.no_grad():
                for p, s0 in zip(params, start):
                    p.copy_(s0)
            torch.manual_seed(cfg.seed)
            opt = torch.optim.Adam(params, lr=lr)
            for step in range(1, steps + 1):
                b = (step - 1) % len(ref.fit)
                loss = _kl(model, ref.fit[b], ref.fit_logp[b], store) + ENTROPY_WEIGHT * _h_rel(
                    store["tokens"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step in checkpoints:
                    kl, ent = held_out()
                    candidates[f"lr={lr:g} steps={step}"] = kl
                    if kl < best[0]:
                        best = (kl, step, lr, [p.detach().clone() for p in params], ent)
    finally:
        with torch.no_grad():
            for p, kept in zip(params, best[3]):
                p.copy_(kept)
        for p, r in saved:
            p.requires_grad_(r)
    return {"objective": "KL(fp || the quantized model) over answer tokens "
                         f"+ {ENTROPY_WEIGHT} * H_rel(visual tokens)",
            "fit_batches": len(ref.fit), "heldout_batches": len(ref.held),
            "heldout_kl_before": kl0, "heldout_kl_after": best[0],
            "visual_entropy_before": ent0, "visual_entropy_after": best[4],
            "steps": steps, "steps_kept": best[1], "lr_kept": best[2],
            "heldout_kl_candidates": candidates,
            "parameters": sum(p.numel() for p in params)}
