"""Visual token reduction inside the torch model: train (and then evaluate) a LLaVA at the
reduced count its export will run at, so that a training-free method's price can be set beside a
model that learned to live with it (issue 19's fine-tuned point).

The selection is the runtime's own (`edgevlm.runtime.token_select.divprune`), applied to the
connector's output by a forward hook: each image's N_full projected features become its N kept
ones, in image order, and `<image>` expands to N tokens. The indices come from the features
without gradient; the kept features carry it. A model trained this way records the setting in
config.json under CONFIG_KEY, so `load_model` (eval, bench, quantize, distill) puts the hook back
and `edgevlm export` writes the same `--visual-tokens` into the export.

Only divprune: visionzip ranks tokens by the tower's attention, which the training forward does
not compute.
"""

from __future__ import annotations

from dataclasses import replace

from edgevlm.errors import UserError

CONFIG_KEY = "edgevlm_visual_tokens"  # {"method": "divprune", "tokens": N} in config.json
TRAINABLE_METHODS = ("divprune",)


def setting(config) -> dict | None:
    """The model's recorded token reduction, or None."""
    value = getattr(config, CONFIG_KEY, None)
    return value if isinstance(value, dict) else None


def check(method: str, tokens: int, available: int, family) -> None:
    """Whether `family` (edgevlm.families.Family) can train at `tokens` of `available`."""
    from edgevlm.runtime.token_select import check as check_count

    if family.expansion_needs_image:
        how = ("come in tiles of a grid" if family.tiled else "depend on the image (an export "
               "of it takes --visual-tokens: the runtime selects)")
        raise UserError(f"training at --visual-tokens works on llava models so far; this model "
                        f"is of the {family.name} family, whose image tokens {how}")
    if method not in TRAINABLE_METHODS:
        raise UserError(f"--token-select {method} cannot train: it ranks tokens by the tower's "
                        f"attention, which training does not compute; use "
                        f"{', '.join(TRAINABLE_METHODS)}")
    check_count(tokens, available)


def install(loaded, method: str, tokens: int):
    """`loaded` (a LoadedModel) with the selection hooked onto its connector and `<image>`
    counted as `tokens`; the setting is written into the model's config."""
    import torch

    from edgevlm.families import family_of, part
    from edgevlm.runtime.token_select import divprune

    model = loaded.model
    full = setting(model.config)
    available = full["full_tokens"] if full else loaded.num_image_tokens
    check(method, tokens, available, family_of(model))

    def keep(module, args, out):  # (B, N_full, D) -> (B, N, D)
        rows = []
        for feats in out:
            idx = divprune(feats.detach().float().cpu().numpy(), tokens)
            rows.append(feats[torch.as_tensor(idx, device=feats.device)])
        return torch.stack(rows)

    part(model, "connector").register_forward_hook(keep)
    setattr(model.config, CONFIG_KEY, {"method": method, "tokens": tokens,
                                       "full_tokens": available})
    return replace(loaded, num_image_tokens=tokens)
