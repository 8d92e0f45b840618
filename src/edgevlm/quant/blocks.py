"""What each method does to one block of decoder layers, for the walk in edgevlm.quant.calibrate:
layer-wise methods (RTN, GPTQ: one Linear at a time from its Hessian), Q-VLM's block search,
the activation-clip search wrapped around either, and Q-VLM's GPTQ guard, which judges the whole
searched model against GPTQ's on held-out samples. edgevlm.quant.api runs them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from edgevlm.progress import Progress
from edgevlm.quant import act, gptq, qvlm, rtn
from edgevlm.quant.calibrate import (
    BlockResult,
    Calibration,
    check_finite,
    decoder_layers,
    layer_forward,
    layer_prefix,
    layer_stats,
    linears,
    no_tokens_fallback,
    relative_error,
    walk,
)
from edgevlm.quant.primitives import QuantConfig

# Layer-wise methods: (W, H, cfg) -> QuantizedWeight. Q-VLM searches whole blocks (qvlm.py).
LAYERWISE = {
    "rtn": lambda W, H, cfg: rtn.quantize_weight(W, cfg),
    "gptq": gptq.quantize_weight,
}


class GptqGuard:
    """Q-VLM never below GPTQ on its own held-out samples. Q-VLM's candidates include GPTQ in
    every block (β = 0 gives GPTQ's integers), but each block is judged by its own output error;
    this judges the whole model. Before the search it keeps the float decoder weights and the
    float model's answer-token log-probabilities on the held-out calibration batches; after it,
    when some block chose β > 0, it quantizes the same blocks again with β = 0 everywhere (GPTQ's
    integers exactly) and keeps whichever of the two has the lower KL(p_fp ‖ p_q) on those
    batches. The report names both KLs and what was kept."""

    def __init__(self, model, targets: dict, batches: list[dict], heldout: int):
        self.model = model
        n = len(batches)
        self.held = batches[n - heldout:][: qvlm.SEARCH_BATCHES] if 0 < heldout < n else []
        self.fp = {name: m.weight.detach().clone() for name, m in targets.items()}
        self.targets = targets
        with torch.no_grad():
            self.refs = [qvlm._answer_logp(model, b, {}) for b in self.held]

    def _heldout_kl(self) -> float:
        with torch.no_grad():
            kls = [float(qvlm._kl(self.model, b, r, {})) for b, r in zip(self.held, self.refs)]
        return sum(kls) / len(kls)

    def settle(self, weights: dict, blocks: list, block_info: list, cfg: QuantConfig,
               device: str, calib: Calibration, quiet: bool = True) -> dict:
        """Compare with GPTQ and keep the better; `weights` and `block_info` are updated in
        place when GPTQ is kept. `calib` is the float model's calibration the search walked
        from (walk leaves its inputs as they were), so the GPTQ pass starts from the same one.
        Its pass takes about as long as a GPTQ run, so it shows a progress bar unless `quiet`."""
        if not self.held:
            return {"kept": "qvlm", "why": "no held-out batches to judge on"}
        if all(b.get("beta", 0.0) == 0.0 for b in block_info):
            return {"kept": "qvlm", "why": "every block chose beta 0: GPTQ's integers already"}
        kl_q = self._heldout_kl()
        searched = {n: m.weight.detach().clone() for n, m in self.targets.items()}
        chosen = dict(weights)
        for name, m in self.targets.items():  # start again from the float decoder
            m.weight.data = self.fp[name].clone()
        gptq_cfg = replace(cfg, qvlm=replace(cfg.qvlm, clip_strengths=(0.0,)))
        gptq_weights: dict = {}
        gptq_info: list = []
        with Progress("GPTQ guard (beta 0)", len(blocks), enabled=not quiet,
                      unit="blocks") as bar:
            def on_block(r, seconds):
                gptq_info.append({**r.decision, "seconds": seconds})
                bar.update(1)

            walk(self.model, calib, blocks, qvlm_block(self.model, gptq_cfg, gptq_weights),
                 on_block, device)
        kl_g = self._heldout_kl()
        out = {"qvlm_heldout_kl": kl_q, "gptq_heldout_kl": kl_g,
               "heldout_batches": len(self.held)}
        if kl_g < kl_q:
            weights.update(gptq_weights)
            block_info[:] = gptq_info
            return {**out, "kept": "gptq"}
        for name, m in self.targets.items():
            m.weight.data = searched[name]
        weights.update(chosen)
        return {**out, "kept": "qvlm"}


def layerwise_block(model, cfg: QuantConfig, weights: dict):
    fn = LAYERWISE[cfg.method]
    layers = decoder_layers(model)

    def quantize_block(block: list[int], xs, calib: Calibration) -> BlockResult:
        result = BlockResult()
        for i in block:  # blocks are single layers for layer-wise methods
            targets = linears(layers[i], layer_prefix(model, i), cfg.skip)
            stats, _ = layer_stats(layers[i], xs, calib.layer_kwargs[i], calib.masks, targets)
            for name, m in targets.items():
                W, H, extra = m.weight.detach().float(), stats[name].hessian, {}
                fallback = no_tokens_fallback(stats[name], W, cfg.for_layer(name))
                if fallback is not None:
                    qw, H, extra = fallback
                else:
                    check_finite(name, W, H)
                    qw = fn(W, H, cfg.for_layer(name))
                deq = qw.dequantize()
                check_finite(name, deq)
                m.weight.data = deq.to(m.weight.dtype)
                weights[name] = qw
                result.records[name] = {"entropy": stats[name].entropy,
                                        "error": relative_error(W, deq, H), **extra}
        return result

    return quantize_block


def qvlm_block(model, cfg: QuantConfig, weights: dict):
    def quantize_block(block: list[int], xs, calib: Calibration) -> BlockResult:
        decision = qvlm.search_block(model, block, xs, calib, cfg)
        qvlm.apply_decision(model, decision)
        weights.update(decision.weights)
        return BlockResult(decision.records, {
            "layers": decision.layers, "beta": decision.beta, "block_error": decision.error,
            "candidate_errors": {str(b): e for b, e in decision.candidate_errors.items()},
            "mean_clip": {n: float(c.mean()) for n, c in decision.clip.items()}},
            decision.outputs)

    return quantize_block


def with_act_search(block_fn, model, cfg: QuantConfig, found: dict, hooks: act.ActHooks):
    """Wrap a method's block function: once the block's weights are quantized, choose each
    Linear's activation clip layer by layer and install the quantizers (act.py, choice 3)."""
    layers = decoder_layers(model)
    grid = cfg.act_clip_grid if cfg.act_bits in act.SEARCHED_BITS else (1.0,)

    def quantize_block(block: list[int], xs, calib: Calibration) -> BlockResult:
        targets = {i: linears(layers[i], layer_prefix(model, i), cfg.skip)
                   for i in block}
        fp = {n: m.weight.detach().clone() for t in targets.values() for n, m in t.items()}
        result = block_fn(block, xs, calib)
        result.outputs = None  # the activation quantizers installed below change them
        h = xs
        for i in block:
            errors = act.search_layer(layers[i], targets[i], fp, h, calib.layer_kwargs[i],
                                      calib.masks, cfg.act_bits, grid)
            spec = act.ActQuantSpec(cfg.act_bits, {n: act.best_clip(e) for n, e in errors.items()},
                                    {n: {str(a): v for a, v in e.items()}
                                     for n, e in errors.items()})
            hooks.install(dict(layers[i].named_modules(prefix=layer_prefix(model, i))),
                          spec)
            for n, clip in spec.clip.items():
                found[n] = (clip, spec.errors[n])
                result.records[n].update(act_clip=clip, act_error=errors[n][clip])
            h = layer_forward(layers[i], h, calib.layer_kwargs[i])
        return result

    return quantize_block
