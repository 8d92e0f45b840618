"""`edgevlm distill` (LLaVA-KD and LLaVA-MoD) and `edgevlm moe-upcycle`.

Kept apart from edgevlm.cli, as quantize and export are; edgevlm.cli registers them on the app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from edgevlm.cli.common import (
    IMAGE_ROOT_HELP,
    LONG_SAMPLES_HELP,
    MAX_LENGTH_HELP,
    SAVE_MINUTES_HELP,
    fit_rows,
    quiet_libraries,
    show_next,
    summary,
)
from edgevlm.cli.next_steps import after_distill
from edgevlm.errors import UserError


def distill_(
    teacher: Path = typer.Option(..., help="Teacher model folder (LLaVA-family)"),
    student: Path = typer.Option(..., help="Student model folder; same tokenizer as the teacher"),
    recipe: str = typer.Option("llava-kd", help="llava-kd (stages dpt,sft,dft) or llava-mod "
                               "(stages dense,upcycle,sparse,pref: an MoE student)"),
    data: Optional[Path] = typer.Option(None, help="Instruction data (LLaVA-format JSON) for "
                                        "sft / dft"),
    out: Path = typer.Option(..., help="Folder to create: OUT/<stage> per stage, OUT/final"),
    pretrain_data: Optional[Path] = typer.Option(None, help="Caption data for dpt"),
    stages: Optional[str] = typer.Option(None, help="llava-kd: a subset of dpt,sft,dft; "
                                         "llava-mod: of dense,upcycle,sparse,pref (default all)"),
    steps: int = typer.Option(1000, help="Steps per stage"),
    batch_size: int = typer.Option(16, help="Per process"),
    lr: float = typer.Option(1e-3),
    warmup: int = typer.Option(50),
    save_every: int = typer.Option(200, help="Checkpoint every N steps"),
    save_every_minutes: Optional[float] = typer.Option(None, help=SAVE_MINUTES_HELP),
    seed: int = typer.Option(0),
    w_res: float = typer.Option(1.0, help="Weight of the response KL (0 turns it off)"),
    w_vis: float = typer.Option(1.0, help="Weight of the visual KL"),
    w_rel: float = typer.Option(1.0, help="Weight of RDist"),
    temperature: float = typer.Option(1.0, help="KL temperature"),
    rel_batch: bool = typer.Option(False, help="RDist over the whole batch's image tokens at "
                                   "once (the reference) instead of per sample"),
    experts: int = typer.Option(4, help="llava-mod: experts per MoE layer"),
    top_k: int = typer.Option(2, help="llava-mod: experts each token is routed to"),
    moe_layers: str = typer.Option("every-other", help="llava-mod: every-other, all, or 0,2,4"),
    ce_weight: float = typer.Option(1.0, help="llava-mod sparse stage: weight of the CE term"),
    aux_weight: float = typer.Option(0.01, help="llava-mod: load-balance loss weight"),
    pref_data: Optional[Path] = typer.Option(None, help="llava-mod pref stage: chosen/rejected "
                                             "pairs in RLAIF-V's layout (default: built from "
                                             "--data and the student's answers)"),
    pref_loss: str = typer.Option("sigmoid", help="llava-mod: sigmoid (DPO) or kto_pair"),
    beta: float = typer.Option(0.1, help="llava-mod: the DPO beta"),
    pref_lr: Optional[float] = typer.Option(None, help="llava-mod pref stage lr (default lr/10)"),
    max_length: Optional[int] = typer.Option(None, help=MAX_LENGTH_HELP),
    long_samples: str = typer.Option("truncate", help=LONG_SAMPLES_HELP),
    image_root: Optional[Path] = typer.Option(None, help=IMAGE_ROOT_HELP + "; --data and "
                                              "--pretrain-data alike"),
    resume: bool = typer.Option(False, help="Continue OUT: skip finished stages, resume the "
                                "unfinished one from its last checkpoint"),
    overwrite: bool = typer.Option(False, help="Redo every stage into an existing OUT"),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Distill a teacher into a student (LLaVA-KD: DPT, SFT, DFT; LLaVA-MoD: an MoE student by
    mimic and preference distillation); runs under accelerate."""
    quiet_libraries()
    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "llava-mod":
        from edgevlm.distill.mod import MOD_STAGES, ModConfig, distill_mod

        if pretrain_data is not None:
            raise UserError("--pretrain-data belongs to llava-kd's dpt stage; llava-mod "
                            "distills on --data (start from a student whose projector is "
                            "trained, e.g. by edgevlm train --stage pretrain)")
        mcfg = ModConfig(stages=stages or MOD_STAGES, steps=steps, batch_size=batch_size,
                         lr=lr, pref_lr=pref_lr, warmup=warmup, save_every=save_every,
                         save_every_minutes=save_every_minutes, seed=seed, experts=experts,
                         top_k=top_k, layers=moe_layers,
                         ce_weight=ce_weight, aux_weight=aux_weight, beta=beta,
                         pref_loss=pref_loss, max_length=max_length, long_samples=long_samples)
        result = distill_mod(teacher, student, data, out, mcfg, pref_data=pref_data,
                             image_root=image_root, resume=resume, overwrite=overwrite,
                             quiet=quiet or as_json)
    else:
        if pref_data is not None:
            raise UserError("--pref-data belongs to --recipe llava-mod's pref stage")
        result = _distill_kd(teacher, student, data, out, pretrain_data, stages, steps,
                             batch_size, lr, warmup, save_every, save_every_minutes, seed,
                             w_res, w_vis, w_rel, temperature, rel_batch, max_length,
                             long_samples, image_root, resume, overwrite, quiet or as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rows: dict = {"out": out, "final": result.final_dir}
    for name, fit in getattr(result, "data", {}).items():  # llava-kd's fit reports
        rows.update(fit_rows(fit, f"{'pretrain' if name == 'dpt' else 'instruction'} data "))
    if getattr(result, "pairs", None):
        rows["preference pairs"] = ", ".join(f"{v} {k}" for k, v in result.pairs.items())
    for r in result.stages:
        rows[r.stage] = ("skipped (finished before)" if r.skipped else
                         f"{r.steps} steps, loss {r.final_loss:.4g}, {r.seconds:.1f} s"
                         if r.final_loss is not None else f"done, {r.seconds:.1f} s"
                         ) + (f", resumed from {r.resumed_from}" if r.resumed_from else "")
    if result.warnings:
        rows["warnings"] = "; ".join(result.warnings)
    rows["seconds"] = result.seconds
    summary("distill", rows, quiet, as_json)
    show_next(after_distill(out, result.final_dir, data), quiet, as_json)


RECIPES = ("llava-kd", "llava-mod")


def _distill_kd(teacher, student, data, out, pretrain_data, stages, steps, batch_size, lr,
                warmup, save_every, save_every_minutes, seed, w_res, w_vis, w_rel, temperature,
                rel_batch, max_length, long_samples, image_root, resume, overwrite, quiet):
    from edgevlm.distill import DistillConfig
    from edgevlm.distill import distill as run_distill

    cfg = DistillConfig(stages=stages or "dpt,sft,dft", steps=steps, batch_size=batch_size,
                        lr=lr, warmup=warmup, save_every=save_every,
                        save_every_minutes=save_every_minutes, seed=seed, w_res=w_res,
                        w_vis=w_vis, w_rel=w_rel,
                        temperature=temperature, rel_per_sample=not rel_batch,
                        max_length=max_length, long_samples=long_samples)
    return run_distill(teacher, student, data, out, cfg, pretrain_data=pretrain_data,
                       image_root=image_root, resume=resume, overwrite=overwrite, quiet=quiet)


def moe_upcycle_(
    model: Path = typer.Argument(..., help="Dense model folder (Llama or Qwen2 decoder)"),
    out: Path = typer.Option(..., help="MoE model folder to create"),
    experts: int = typer.Option(4, help="Experts per MoE layer, each a copy of the dense FFN"),
    top_k: int = typer.Option(2, help="Experts each token is routed to"),
    layers: str = typer.Option("every-other", help="Which layers get experts: every-other "
                               "(0, 2, 4, ...), all, or a list such as 0,2,4"),
    seed: int = typer.Option(0, help="Seed of the routers' small random start"),
    init: str = typer.Option("copy", help="copy (sparse upcycling: each expert a copy of the "
                             "dense FFN) or random (fresh experts: a control for ablations)"),
    overwrite: bool = typer.Option(False, help="Replace OUT"),
    quiet: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sparse upcycling (LLaVA-MoD): give a dense model's decoder mixture-of-experts FFNs that
    start as copies of the dense FFN, so the new model computes what the old one did."""
    quiet_libraries()
    from edgevlm.errors import check_seed
    from edgevlm.models.moe import MoESpec, upcycle_dir

    check_seed(seed)
    spec = MoESpec(experts, top_k, layers, seed=seed, init=init)
    counts = upcycle_dir(model, out, spec, overwrite)
    summary("moe-upcycle", {"out": out, "experts": counts["experts"], "top_k": counts["top_k"],
                            "parameters": f"{counts['total'] / 1e6:.2f}M total, "
                            f"{counts['activated'] / 1e6:.2f}M activated per token"},
            quiet, as_json)
