"""Sparse upcycling: a dense student's decoder becomes a sparse mixture of experts (LLaVA-MoD).

LLaVA-MoD (Shu et al., ICLR 2025) gives every other decoder layer (0, 2, 4, ...) an MoE FFN of
4 experts with top-2 routing; each expert starts as an exact copy of the layer's dense FFN, the
router is a Linear(d, E) without bias, and a load-balance loss of weight 0.01 keeps the experts
in use. The result here is a normal Hugging Face model directory: the text model becomes
transformers' Qwen2-MoE (`Qwen2MoeForCausalLM` layers under the same LLaVA / Idefics3 shell),
which has what that layout needs and nothing it does not:

- `mlp_only_layers` keeps a dense SwiGLU FFN on the layers left out;
- `norm_topk_prob=True` renormalises the top-k router probabilities, as DeepSpeed's top-2 gate
  that LLaVA-MoD trains with does;
- Qwen2-MoE always has a shared expert; `shared_expert_intermediate_size=0` makes it empty
  (its output, and its sigmoid gate's contribution, is exactly zero), so the layer is the
  LLaVA-MoD layer. The exporter writes no node for it.
- Llama's attention is Qwen2-MoE's with `qkv_bias=False`; Qwen2's keeps its biases.

Because the experts are copies and the top-k weights sum to one, the upcycled model computes
the dense model's function before any training (up to float rounding of w1·f + w2·f), whatever
the router says; the router is drawn small and random so that training breaks the symmetry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.families.backbones import DENSE_TEXT_TYPES, is_moe, o_bias, qkv_bias  # noqa: F401

AUX_LOSS_WEIGHT = 0.01  # LLaVA-MoD's load-balance loss weight
EXPERT_INITS = ("copy", "random")


@dataclass(frozen=True)
class MoESpec:
    experts: int = 4
    top_k: int = 2
    layers: str = "every-other"  # "every-other" (0, 2, 4, ...), "all", or "0,2,5"
    router_std: float = 0.02
    seed: int = 0
    init: str = "copy"  # "copy": sparse upcycling; "random": fresh experts (the ablation's
    # control, initializer_range as transformers draws new weights)


def parse_layers(layers: str, num_layers: int) -> list[int]:
    """"every-other" | "all" | "0,2,5" -> the sorted layer indices that get experts."""
    text = str(layers).strip().lower()
    if text == "every-other":
        return list(range(0, num_layers, 2))
    if text == "all":
        return list(range(num_layers))
    try:
        idx = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"--layers {layers!r} is not every-other, all, or a comma list of layer "
                        "indices such as 0,2,4") from None
    bad = [i for i in idx if not 0 <= i < num_layers]
    if not idx or bad:
        raise UserError(f"--layers {layers!r}: the decoder has layers 0..{num_layers - 1}"
                        + (f"; {bad} are outside it" if bad else "; the list is empty"))
    return idx


def check_spec(spec: MoESpec, num_layers: int) -> list[int]:
    if spec.experts < 2:
        raise UserError(f"--experts {spec.experts}: a mixture needs at least 2 experts")
    if not 1 <= spec.top_k <= spec.experts:
        raise UserError(f"--top-k {spec.top_k} must be between 1 and --experts {spec.experts}; "
                        f"a token cannot be routed to more experts than exist")
    if spec.init not in EXPERT_INITS:
        raise UserError(f"expert init {spec.init!r} is not one of {', '.join(EXPERT_INITS)}")
    if not spec.router_std >= 0:
        raise UserError(f"router std must be >= 0, got {spec.router_std}")
    return parse_layers(spec.layers, num_layers)


def moe_text_config(tc, spec: MoESpec, layers: list[int]) -> dict:
    """The Qwen2-MoE text config dict of dense text config `tc` with experts on `layers`."""
    if tc.model_type not in DENSE_TEXT_TYPES:
        raise UserError(f"upcycling covers dense {', '.join(DENSE_TEXT_TYPES)} decoders, not "
                        f"{tc.model_type!r}")
    if getattr(tc, "mlp_bias", False) or getattr(tc, "hidden_act", "silu") != "silu":
        raise UserError("upcycling copies a SwiGLU FFN without biases into the experts; this "
                        "decoder's FFN has biases or another activation")
    if o_bias(tc):
        raise UserError("this Llama has attention biases on o_proj too, which Qwen2-MoE's "
                        "attention does not hold; upcycling it would change the model")
    n = tc.num_hidden_layers
    heads = tc.num_attention_heads
    return {
        "model_type": "qwen2_moe",
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,  # the dense layers' FFN
        "moe_intermediate_size": tc.intermediate_size,  # each expert: a copy of it
        "shared_expert_intermediate_size": 0,
        "num_experts": spec.experts, "num_experts_per_tok": spec.top_k,
        "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n) if i not in layers],
        "router_aux_loss_coef": AUX_LOSS_WEIGHT, "output_router_logits": False,
        "num_hidden_layers": n, "num_attention_heads": heads,
        "num_key_value_heads": tc.num_key_value_heads or heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        "hidden_act": "silu", "max_position_embeddings": tc.max_position_embeddings,
        "rms_norm_eps": tc.rms_norm_eps, "rope_parameters": copy.deepcopy(tc.rope_parameters),
        "qkv_bias": qkv_bias(tc), "tie_word_embeddings": tc.tie_word_embeddings,
        "use_sliding_window": False, "attention_dropout": 0.0,
        "initializer_range": getattr(tc, "initializer_range", 0.02),
        "bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id,
        "pad_token_id": tc.pad_token_id,
    }


def upcycle(loaded, spec: MoESpec = MoESpec()):
    """A new LoadedModel: `loaded`'s model with experts on spec.layers, each a copy of the
    layer's dense FFN; everything else (vision tower, projector, attention, norms, embeddings,
    head) copied as is."""
    import torch

    from edgevlm.families import family_of
    from edgevlm.models import LoadedModel

    model = loaded.model
    family = family_of(model)
    tc = model.config.text_config
    if is_moe(tc):
        raise UserError("the model is already a mixture of experts (text model_type "
                        f"{tc.model_type}); upcycle its dense parent instead")
    layers = check_spec(spec, tc.num_hidden_layers)
    cfg = model.config.to_dict()
    cfg["text_config"] = moe_text_config(tc, spec, layers)
    for key in ("_name_or_path", "transformers_version", "architectures"):
        cfg.pop(key, None)
    config = type(model.config)(**cfg)
    new = type(model)(config)
    dense = model.state_dict()
    target = new.state_dict()
    g = torch.Generator().manual_seed(spec.seed)
    text = family.prefix("language_model")
    out = {}
    for key, value in target.items():
        if key in dense and dense[key].shape == value.shape:
            out[key] = dense[key].detach().clone()
    for i in layers:
        src, dst = f"{text}layers.{i}.mlp.", f"{text}layers.{i}.mlp."
        gate, up, down = (dense[f"{src}{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        out[f"{dst}experts.gate_up_proj"] = torch.cat([gate, up]).unsqueeze(0).repeat(
            spec.experts, 1, 1)
        out[f"{dst}experts.down_proj"] = down.unsqueeze(0).repeat(spec.experts, 1, 1)
        if spec.init == "random":
            std = getattr(tc, "initializer_range", 0.02)
            for name in ("gate_up_proj", "down_proj"):
                w = out[f"{dst}experts.{name}"]
                out[f"{dst}experts.{name}"] = torch.randn(w.shape, generator=g) * std
        out[f"{dst}gate.weight"] = torch.randn(spec.experts, tc.hidden_size,
                                               generator=g) * spec.router_std
        for key in target:  # the empty shared expert and its gate
            if key.startswith(f"{dst}shared_expert"):
                out[key] = torch.zeros_like(target[key])
    missing = sorted(set(target) - set(out))
    assert not missing, f"upcycle left weights unset: {missing[:5]}"
    new.load_state_dict(out, strict=True)
    if getattr(new.config, "tie_word_embeddings", False) or tc.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    new.eval()
    return LoadedModel(new, loaded.processor, loaded.image_token_id, loaded.num_image_tokens)


def upcycle_dir(model_dir, out, spec: MoESpec = MoESpec(), overwrite: bool = False) -> dict:
    """edgevlm moe-upcycle: read MODEL, write the upcycled model directory OUT atomically;
    returns its parameter counts."""
    from edgevlm.atomic import atomic_dir, check_new
    from edgevlm.models import load_model, save_model

    out = Path(out)
    check_new(out, overwrite, [model_dir])
    loaded = upcycle(load_model(model_dir), spec)
    counts = parameter_counts(loaded.model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(loaded, tmp)
    return counts


def parameter_counts(model) -> dict:
    """{"total": all parameters, "activated": those one token runs through (top-k of each
    layer's experts), "experts", "top_k"}."""
    tc = model.config.text_config
    total = sum(p.numel() for p in model.parameters())
    if not is_moe(tc):
        return {"total": total, "activated": total, "experts": 0, "top_k": 0}
    idle = 0
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            idle += p.numel() // tc.num_experts * (tc.num_experts - tc.num_experts_per_tok)
    return {"total": total, "activated": total - idle, "experts": tc.num_experts,
            "top_k": tc.num_experts_per_tok}


def routers(model) -> list:
    """The router modules of an MoE model, in layer order."""
    from edgevlm.families import part

    text = part(model, "language_model")
    return [layer.mlp.gate for layer in text.layers if hasattr(layer.mlp, "experts")]


class RouterLogits:
    """Collects every router's logits (tokens, E) during one forward (a hook per router), for
    the load-balance loss; a context manager that removes its hooks."""

    def __init__(self, model):
        self.logits, self.handles = [], []
        for r in routers(model):
            self.handles.append(r.register_forward_hook(
                lambda _m, _i, out: self.logits.append(out[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def load_balance_loss(router_logits: list, num_experts: int, top_k: int, attention_mask=None):
    """Switch/Mixtral load-balance loss over all routers, as transformers computes it for
    Qwen2-MoE (fraction of tokens sent to each expert × its mean router probability × E)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)


def _expert_module(hidden: int, inter: int):
    import torch
    from torch import nn

    class Expert(nn.Module):
        """One expert as three Linears: the layout of Qwen2-MoE checkpoints on disk. `rows`
        (1, T_e) marks which of the rows routed to it in this forward are real tokens (read by
        the calibration hooks on its Linears)."""

        rows = None

        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
            self.up_proj = nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)

        def forward(self, x, rows):  # x (1, T_e, D) -> (1, T_e, D)
            self.rows = rows
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    return Expert()


def linear_experts(fused):
    """A module that computes what transformers' fused experts (gate_up_proj (E, 2I, D),
    down_proj (E, D, I)) compute, with every expert's gate/up/down as an nn.Linear: the
    quantizer then treats each expert's Linears like any other, and its hooks see exactly the
    tokens the router sends to that expert. Saved, its keys are the per-expert keys transformers
    writes for Qwen2-MoE anyway (experts.{e}.gate_proj.weight, ...), so a compressed-tensors
    checkpoint of it loads back into the fused experts.

    `token_mask` (flattened (B·S,) bool, set by the calibration loop) marks real tokens; each
    expert's `rows` (1, T_e) then says which of its routed rows are real."""
    import torch
    from torch import nn

    num, two_inter, hidden = fused.gate_up_proj.shape
    inter = two_inter // 2
    if type(fused.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        raise UserError(f"the experts' activation is {type(fused.act_fn).__name__}; edgevlm's "
                        "per-expert Linears compute SwiGLU (silu) only")

    class LinearExperts(nn.ModuleList):
        token_mask = None

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e, expert in enumerate(self):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                rows = (self.token_mask[tok] if self.token_mask is not None
                        else torch.ones_like(tok, dtype=torch.bool))[None]
                # (1, T_e, D): 3-D, as every Linear's input
                y = expert(hidden_states[tok][None], rows)[0] * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
            return out

    experts = LinearExperts([_expert_module(hidden, inter) for _ in range(num)])
    experts.to(fused.gate_up_proj.device, fused.gate_up_proj.dtype)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :inter])
            expert.up_proj.weight.copy_(fused.gate_up_proj[e, inter:])
            expert.down_proj.weight.copy_(fused.down_proj[e])
    return experts


def linearize(model) -> int:
    """Replace every fused experts module of `model` by linear_experts, in place; returns how
    many layers had experts. The function is unchanged (same routing, same weights)."""
    from edgevlm.families import part

    n = 0
    for layer in part(model, "language_model").layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts") and getattr(mlp.experts, "gate_up_proj", None) is not None:
            mlp.experts = linear_experts(mlp.experts)
            n += 1
    return n
