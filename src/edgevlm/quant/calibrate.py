"""The one calibration loop: walk the language model's decoder one block of layers at a time.

As in the GPTQ reference (`opt_sequential`): run the whole model once on the calibration batches
to capture the inputs of decoder layer 0 and every layer's keyword arguments (masks, rotary
embeddings); then, per block, a method quantizes the block's layers using inputs that come from
the already-quantized earlier blocks, and the block's outputs are recomputed with the quantized
weights to feed the next one, so errors propagate as they will at inference. Only one layer's
activations (plus the hidden states between blocks) are held at a time.

Per Linear we accumulate the GPTQ Hessian H = 2XᵀX/n over real (non-padding) tokens and the
Shannon entropy of its input activations: a 256-bin histogram over each sample's values,
H = −Σ p log2 p, averaged over samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgevlm.data import pixels_of
from edgevlm.errors import UserError
from edgevlm.families import family_of, part
from edgevlm.quant import rtn
from edgevlm.quant.primitives import QuantConfig

BINS = 256


def entropy(x: torch.Tensor) -> float:
    """Shannon entropy (bits) of a 256-bin histogram of x's values."""
    x = x.detach().float().reshape(-1)
    if x.numel() == 0:
        return 0.0
    if not torch.isfinite(x).all():
        return float("nan")  # the caller names the layer (check_finite)
    if x.max() == x.min():
        return 0.0
    p = torch.histc(x, bins=BINS, min=x.min().item(), max=x.max().item())
    p = p[p > 0] / x.numel()
    return float(-(p * p.log2()).sum())


def batch_entropy(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """`entropy(x[b][mask[b]])` for every sample b of x (B, S, K), in a few whole-batch tensor
    ops instead of a histogram (and its min/max round trips) per sample: each real value's bin
    is found against its own sample's range, and one bincount counts every sample's bins."""
    x = x.detach().float()
    B = x.shape[0]
    counts = mask.sum(1) * x.shape[-1]  # values per sample
    if not torch.isfinite(x[mask]).all():
        return [entropy(x[b][mask[b]]) for b in range(B)]  # nan where a sample overflows
    big = torch.finfo(torch.float32).max
    m = mask[..., None].expand_as(x)
    lo = torch.where(m, x, big).amin((1, 2))
    hi = torch.where(m, x, -big).amax((1, 2))
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    # histc's bins: [lo + i·w/256, lo + (i+1)·w/256), the maximum in the last one
    idx = ((x - lo[:, None, None]) * (BINS / width[:, None, None])).long().clamp_(0, BINS - 1)
    idx += torch.arange(B, device=x.device)[:, None, None] * BINS
    hist = torch.bincount(idx[m], minlength=B * BINS).view(B, BINS).double()
    p = hist / counts.clamp_min(1)[:, None].double()
    h = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)
    h[(hi == lo) | (counts == 0)] = 0.0
    return h.tolist()


@dataclass
class LinearStats:
    """What one Linear saw: its Hessian and the entropy of its inputs."""

    H: torch.Tensor  # (K, K) float64
    tokens: int = 0
    entropy_sum: float = 0.0
    samples: int = 0

    @property
    def hessian(self) -> torch.Tensor:
        return self.H * (2.0 / max(self.tokens, 1))

    @property
    def entropy(self) -> float:
        return self.entropy_sum / max(self.samples, 1)

    def add(self, x: torch.Tensor, mask: torch.Tensor, with_entropy: bool = True) -> None:
        """x (B, S, K) inputs, mask (B, S) real tokens."""
        xm = x[mask].float()  # (T, K) real tokens of the whole batch
        self.H += (xm.T @ xm).double()
        self.tokens += xm.shape[0]
        if with_entropy:
            self.entropy_sum += sum(batch_entropy(x, mask))
            self.samples += x.shape[0]


@dataclass
class Calibration:
    """Decoder inputs captured from the float model, batch by batch."""

    hidden: list[torch.Tensor]  # per batch: inputs of the next layer to process, (B, S, D)
    layer_kwargs: list[list[dict]]  # [layer][batch] keyword arguments of the decoder layer
    masks: list[torch.Tensor]  # per batch: (B, S) bool, real tokens
    input_entropy: list[float]  # per layer: entropy of its (float-model) input hidden states
    samples: int
    heldout: int = 0  # the last this many batches are held out (Q-VLM judges its search there)


def decoder_layers(model) -> torch.nn.ModuleList:
    return part(model, "language_model").layers


def layer_prefix(model, i: int) -> str:
    """Decoder layer i's module name in the whole model."""
    return f"{family_of(model).path('language_model')}.layers.{i}"


def prepare(model, batches: list[dict], heldout: int = 0) -> Calibration:
    """One float forward pass over the batches, capturing what the layer loop needs."""
    layers = decoder_layers(model)
    hidden, kwargs = [], [[] for _ in layers]
    ent_sum = [0.0] * len(layers)
    masks = [b["attention_mask"].bool() for b in batches]
    current = {}

    def pre_hook(i):
        def hook(module, args, kw):
            x = args[0] if args else kw["hidden_states"]
            if i == 0:
                hidden.append(x.detach())
            kw = {k: v for k, v in kw.items()
                  if k not in ("hidden_states", "past_key_values", "use_cache")}
            kwargs[i].append(kw)
            m = current["mask"]
            ent_sum[i] += sum(batch_entropy(x, m))
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch, mask in zip(batches, masks):
                current["mask"] = mask
                # the base model, without the LM head: its logits over every position (B·S·V
                # floats, 400 MB a batch on SmolLM2) are not needed, only the layers' inputs
                part(model, "backbone")(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"],
                                        **pixels_of(batch, model.dtype), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = sum(int(m.shape[0]) for m in masks)
    return Calibration(hidden, kwargs, masks, [e / n for e in ent_sum], n, heldout)


def layer_forward(layer, xs: list[torch.Tensor], kws: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [layer(x, **kw) for x, kw in zip(xs, kws)]
    return [o[0] if isinstance(o, tuple) else o for o in outs]


def linears(module, prefix: str, skip: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """The quantizable Linears under `module`, by full module name, in forward order. An MoE
    layer's experts count once linearized (edgevlm.models.moe.linearize); its router is not a
    Linear, and Qwen2-MoE's shared expert (empty in edgevlm's upcycled students) and its gate stay
    float."""
    return {f"{prefix}.{n}": m for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features and m.out_features
            and "shared_expert" not in n and not any(s in f"{prefix}.{n}" for s in skip)}


def layer_stats(layer, xs, kws, masks, targets: dict[str, torch.nn.Linear],
                with_entropy: bool = True) -> tuple[dict[str, LinearStats], list[torch.Tensor]]:
    """Run `layer` on its inputs with hooks on `targets`; returns their stats and the outputs.

    Linears that read the same tensor (q/k/v after the input norm, gate/up after the second)
    share one LinearStats: their Hessians are equal, so it is accumulated once. The input
    entropy (only reported, never searched on) is taken on the first batch: on every batch its
    histograms were about 5% of a Q-VLM run on SmolLM2. Without `with_entropy` it is skipped."""
    stats: dict[str, LinearStats] = {}
    # (data_ptr, shape) of an input seen in this batch -> (first Linear, the tensor): holding the
    # tensor keeps its memory from being reused by a later, different input of the same shape
    owner: dict[tuple, tuple[str, torch.Tensor]] = {}

    def seen(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        first = owner.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), (name, x))[0]
        if name not in stats:
            stats[name] = stats[first] if first != name else LinearStats(
                torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device))
        if first == name:
            # the first batch: no sample's entropy counted yet
            stats[name].add(x, mask, with_entropy and stats[name].samples == 0)

    def batch_start() -> None:
        owner.clear()

    outs = _run_hooked(layer, xs, kws, masks, targets, seen, batch_start)
    for name, m in targets.items():  # an expert no calibration token was routed to
        stats.setdefault(name, LinearStats(torch.zeros(m.in_features, m.in_features,
                                                       dtype=torch.float64,
                                                       device=m.weight.device)))
    return stats, outs


def no_tokens_fallback(stat: LinearStats, W: torch.Tensor, cfg: QuantConfig):
    """For a Linear that saw no calibration token (an MoE expert the router never chose on the
    calibration data): its weights rounded to nearest and the identity as its Hessian, so its
    error is the plain weight error. GPTQ on a zero Hessian would zero every column instead.
    Returns (QuantizedWeight, H, record fields), or None for a Linear that saw tokens."""
    if stat.tokens:
        return None
    H = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
    return rtn.quantize_weight(W, cfg), H, {"calibration_tokens": 0,
                                           "rounded": "to nearest: no calibration token "
                                                      "was routed to it"}


def visit_inputs(layer, xs, kws, masks, targets: dict[str, torch.nn.Linear],
                 visit: Callable[[str, torch.Tensor], None]) -> list[torch.Tensor]:
    """Run `layer` on its inputs; `visit(name, x)` sees each target's input rows of real tokens
    (T, K), one batch at a time, so nothing is stored. Returns the layer's outputs."""
    return _run_hooked(layer, xs, kws, masks, targets,
                       lambda name, x, mask: visit(name, x[mask]))


def _run_hooked(layer, xs, kws, masks, targets: dict[str, torch.nn.Linear],
                seen: Callable[[str, torch.Tensor, torch.Tensor], None],
                batch_start: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Run `layer` batch by batch without gradients; `seen(name, x, mask)` gets each target's
    input (B, S, K) and the batch's real-token mask (B, S); `batch_start()`, if given, is called
    before each batch. Returns the layer's outputs."""
    current = {}

    routed = [m for m in layer.modules() if hasattr(m, "token_mask")]  # linearized experts
    expert_of = {id(lin): e for e in layer.modules() if hasattr(e, "rows")
                 for lin in e.children()}

    def hook(name):
        def fn(module, args):
            # an expert's Linear sees only its routed rows (1, T_e, K): the expert's own
            # real-token mask of those rows (edgevlm.models.moe.linear_experts)
            expert = expert_of.get(id(module))
            seen(name, args[0].detach(), current["mask"] if expert is None else expert.rows)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    outs = []
    try:
        with torch.no_grad():
            for x, kw, mask in zip(xs, kws, masks):
                current["mask"] = mask
                for m in routed:
                    m.token_mask = mask.reshape(-1)
                if batch_start is not None:
                    batch_start()
                o = layer(x, **kw)
                outs.append(o[0] if isinstance(o, tuple) else o)
    finally:
        for h in handles:
            h.remove()
        for m in routed:
            m.token_mask = None
    return outs


def relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖ / ‖WX‖ from H ∝ XXᵀ, without the inputs."""
    D = (W - Wq).double()
    num = torch.einsum("ik,kl,il->", D, H, D)
    den = torch.einsum("ik,kl,il->", W.double(), H, W.double())
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise UserError(f"NaN or inf appeared while quantizing {name}; the calibration data "
                            "or the model's weights overflow there (check the model in float32)")


@dataclass
class BlockResult:
    """What a method did to one block: its per-Linear records and any searched decisions."""

    records: dict[str, dict] = field(default_factory=dict)  # name -> entropy, error, ...
    decision: dict = field(default_factory=dict)
    # the block's outputs on every batch with its quantized weights, when the method computed
    # them anyway (walk then skips recomputing them)
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)


BlockFn = Callable[[list[int], list[torch.Tensor], Calibration], BlockResult]


def to_device(obj, device):
    """Tensors in `obj` (nested tuples, lists and dicts) moved to `device`; the rest as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def walk(model, calib: Calibration, blocks: list[list[int]], quantize_block: BlockFn,
         on_block: Callable[[BlockResult, float], None] | None = None,
         device: str = "cpu", done: int = 0) -> list[BlockResult]:
    """The loop: for each block, `quantize_block(layer indices, inputs, calib)` quantizes those
    layers in place; then the block's outputs are recomputed with the quantized weights.

    The first `done` blocks are quantized already (a resumed run put a killed run's integers
    back): only their outputs are computed, so the next block's inputs are the ones an
    uninterrupted run gave it. Returns the results of the blocks quantized here.

    On a `device` other than the model's (a GPU), only the block being quantized is there: its
    layers and their keyword arguments go to the device before it and the layers come back
    after; the hidden states between blocks and the masks stay on the device."""
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    calib.masks = [m.to(device) for m in calib.masks]
    xs = [x.to(device) for x in calib.hidden]
    results = []
    for k, block in enumerate(blocks):
        t0 = time.time()
        for i in block:
            layers[i].to(device)
            calib.layer_kwargs[i] = to_device(calib.layer_kwargs[i], device)
        result = quantize_block(block, xs, calib) if k >= done else None
        if result is not None and result.outputs is not None:
            xs, result.outputs = result.outputs, None
        else:
            for i in block:
                xs = layer_forward(layers[i], xs, calib.layer_kwargs[i])
        for i in block:
            check_finite(f"decoder layer {i}", *xs)
            layers[i].to(home)
            calib.layer_kwargs[i] = to_device(calib.layer_kwargs[i], home)
        if result is not None:
            results.append(result)
            if on_block:
                on_block(result, time.time() - t0)
    return results
