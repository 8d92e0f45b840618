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
   whole block by the block's output error ‖Y_q − Y_fp‖² / ‖Y_fp‖². β = 0 is plain GPTQ, so on
   calibration data the block error is never worse than GPTQ's.
4. Vision-side optimization (`optimize_vision`, on by default, `--no-vision-opt` to measure it).
   Before the search, the projector and the vision tower's final norms are trained for at most
   `vision_opt_steps` Adam steps on loss = KL(p_fp ‖ p) over answer tokens + λ·H_rel(visual
   tokens). H_rel = mean_f ½·log(var_f) − ½·log(mean_f var_f) is a differentiable, scale-free
   stand-in for the histogram entropy of the tokens entering the language model (that histogram
   spans the tokens' own range, so shrinking every feature does not lower it; an earlier
   version without the second term did exactly that and cost ~5 points, see
   benchmarks/results/quant_ablation_*). A trust region keeps the answers: a step whose
   parameters move the answer distribution by more than KL_BUDGET nats per token is undone and
   the optimization stops there. These float parameters are saved in the checkpoint (they are
   not quantized); the report gives the KL and the histogram entropy before and after.
5. Decisions are data: `BlockDecision` holds the block, β, the per-Linear clip scales, the
   candidates' errors and the resulting integers; `apply_decision` writes them into the model.
6. Activation quantization (act_bits 8/6/4) is the same for every method (edgevlm.quant.act): the
   β search above sees float activations inside the block; the activation clipping is searched
   after it, layer by layer, against the float layer's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edgevlm.quant import gptq
from edgevlm.quant.calibrate import (
    Calibration,
    check_finite,
    decoder_layers,
    entropy,
    layer_forward,
    layer_stats,
    linears,
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
KL_BUDGET = 1e-3  # nats per answer token the vision-side optimization may move the answers


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
    """Per (row, group) clip ratio from cfg.clip_grid minimising e_g H_gg e_gᵀ; (N, G).

    A ragged last group (K mod gs columns) is scored on its own columns: the error and H are
    padded with zeros to whole groups, so the padding adds nothing to eᵀHe."""
    n, k = W.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    G = n_groups(k, gs)
    pad = G * gs - k
    Hp = F.pad(H.float(), (0, pad, 0, pad))
    Hg = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])
    best_err = torch.full((n, G), float("inf"))
    best = torch.ones((n, G))
    for a in cfg.clip_grid:
        D = (W - fake_quantize(W, choose_qparams(W, cfg.bits, gs, cfg.symmetric, a)))
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

    @property
    def error(self) -> float:
        return self.candidate_errors[self.beta]


def search_block(model, block: list[int], xs: list[torch.Tensor], calib: Calibration,
                 cfg: QuantConfig) -> BlockDecision:
    """Search β (and so every Linear's clip scales) for one block; the model is left float."""
    layers = decoder_layers(model)
    prefix = "model.language_model.layers"
    targets = {i: linears(layers[i], f"{prefix}.{i}", cfg.skip) for i in block}
    fp = {n: m.weight.detach().clone() for t in targets.values() for n, m in t.items()}
    ys = xs
    for i in block:
        ys = layer_forward(layers[i], ys, calib.layer_kwargs[i])
    norm = sum(float(y.double().pow(2).sum()) for y in ys)

    best = None
    errors = {}
    for beta in cfg.clip_strengths:
        h, weights, clips, records = xs, {}, {}, {}
        for i in block:
            stats, _ = layer_stats(layers[i], h, calib.layer_kwargs[i], calib.masks, targets[i])
            for name, m in targets[i].items():
                W, H = fp[name].float(), stats[name].hessian
                check_finite(name, W, H)
                clip = 1 - beta * (1 - group_clip(W, H, cfg))
                qw = gptq.quantize_weight(W, H, cfg, clip)
                deq = qw.dequantize()
                check_finite(name, deq)
                m.weight.data = deq.to(m.weight.dtype)
                weights[name], clips[name] = qw, clip
                records[name] = {"entropy": stats[name].entropy,
                                 "error": relative_error(W, deq, H)}
            h = layer_forward(layers[i], h, calib.layer_kwargs[i])
        check_finite(f"decoder layers {block}", *h)
        err = (sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(h, ys))
               / max(norm, 1e-30)) ** 0.5
        errors[beta] = err
        if best is None or err < errors[best.beta]:
            best = BlockDecision(list(block), beta, clips, errors, weights, records)
        for name, m in ((n, m) for t in targets.values() for n, m in t.items()):
            m.weight.data = fp[name].clone()
    best.candidate_errors = errors
    return best


def apply_decision(model, decision: BlockDecision) -> None:
    """Write a block's searched integers into the model (as their exact float values)."""
    modules = dict(model.named_modules())
    for name, qw in decision.weights.items():
        m = modules[name]
        m.weight.data = qw.dequantize().to(m.weight.dtype)


def _visual_tokens(model, batch, store: dict):
    def hook(module, args, out):
        store["tokens"] = out
    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"].to(model.dtype), use_cache=False)
    finally:
        handle.remove()
    return out.logits


def optimize_vision(model, batches: list[dict], cfg: QuantConfig) -> dict:
    """Lower the entropy of the visual tokens while keeping the float model's answers."""
    params = list(model.model.multi_modal_projector.parameters())
    params += [p for n, p in model.model.vision_tower.named_parameters()
               if "post_layernorm" in n or "head.layernorm" in n]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    store: dict = {}
    with torch.no_grad():
        refs = [torch.log_softmax(_visual_tokens(model, b, store), -1) for b in batches]
        before = sum(entropy(store_tokens(model, b)) for b in batches) / len(batches)
    opt = torch.optim.Adam(params, lr=1e-3)
    torch.manual_seed(cfg.seed)
    kept = [p.detach().clone() for p in params]  # the last parameters known to be in budget
    kept_step = 0  # Adam steps behind `kept`
    try:
        model.train(False)
        for step in range(cfg.vision_opt_steps):
            b = step % len(batches)
            kl = _kl(model, batches[b], refs[b], store)
            if float(kl.detach()) > KL_BUDGET:
                break
            kept, kept_step = [p.detach().clone() for p in params], step
            tok = store["tokens"].reshape(-1, store["tokens"].shape[-1])
            var = tok.var(0) + 1e-8
            h_rel = 0.5 * (torch.log(var).mean() - torch.log(var.mean()))
            loss = kl + ENTROPY_WEIGHT * h_rel
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, r in saved:
            p.requires_grad_(r)
    with torch.no_grad():
        kl = max(float(_kl(model, x, r, store)) for x, r in zip(batches, refs))
        steps_kept = step + 1 if cfg.vision_opt_steps else 0
        if kl > KL_BUDGET:  # the step the loop stopped at, or its last one, left the budget
            for p, k in zip(params, kept):
                p.copy_(k)
            kl = max(float(_kl(model, x, r, store)) for x, r in zip(batches, refs))
            steps_kept = kept_step
        after = sum(entropy(store_tokens(model, b)) for b in batches) / len(batches)
    return {"visual_entropy_before": before, "visual_entropy_after": after,
            "final_kl": kl, "steps": cfg.vision_opt_steps, "steps_kept": steps_kept,
            "kl_budget": KL_BUDGET,
            "parameters": sum(p.numel() for p in params)}


def _kl(model, batch, ref, store) -> torch.Tensor:
    """KL(p_fp ‖ p) per answer token, for the current parameters."""
    sel = batch["labels"] != -100
    logp = torch.log_softmax(_visual_tokens(model, batch, store), -1)[sel]
    return torch.nn.functional.kl_div(logp, ref[sel], log_target=True, reduction="batchmean")


def store_tokens(model, batch) -> torch.Tensor:
    store: dict = {}
    _visual_tokens(model, batch, store)
    return store["tokens"]
