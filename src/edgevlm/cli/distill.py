"""`edgevlm distill` (LLaVA-KD and LLaVA-MoD) and `edgevlm moe-upcycle`.

Kept apart from edgevlm.cli, as quantize and export are; edgevlm.cli registers them on the app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.cli.common import (
    IMAGE_ROOT_HELP,
    BatchSizeOpt,
    JsonOpt,
    LongSamplesOpt,
    LrOpt,
    MaxLengthOpt,
    QuietOpt,
    SaveEveryOpt,
    SaveMinutesOpt,
    SeedOpt,
    WarmupOpt,
    fit_rows,
    quiet_libraries,
    show_next,
    summary,
)
from edgevlm.cli.next_steps import after_distill
from edgevlm.errors import UserError

RECIPES = ("llava-kd", "llava-mod")

# distill's own options, each declared once; the training options it shares with `edgevlm
# train` are in edgevlm.cli.common.
TeacherOpt = Annotated[Path, typer.Option(help="Teacher model folder (LLaVA-family)")]
StudentOpt = Annotated[Path, typer.Option(
    help="Student model folder; same tokenizer as the teacher")]
RecipeOpt = Annotated[str, typer.Option(
    help="llava-kd (stages dpt,sft,dft) or llava-mod (stages dense,upcycle,sparse,pref: an MoE "
    "student)")]
DataOpt = Annotated[Optional[Path], typer.Option(
    help="Instruction data (LLaVA-format JSON) for sft / dft")]
OutOpt = Annotated[Path, typer.Option(
    help="Folder to create: OUT/<stage> per stage, OUT/final")]
PretrainDataOpt = Annotated[Optional[Path], typer.Option(help="Caption data for dpt")]
StagesOpt = Annotated[Optional[str], typer.Option(
    help="llava-kd: a subset of dpt,sft,dft; llava-mod: of dense,upcycle,sparse,pref (default "
    "all)")]
StepsOpt = Annotated[int, typer.Option(help="Steps per stage")]
# llava-kd's loss
WResOpt = Annotated[float, typer.Option(help="Weight of the response KL (0 turns it off)")]
WVisOpt = Annotated[float, typer.Option(help="Weight of the visual KL")]
WRelOpt = Annotated[float, typer.Option(help="Weight of RDist")]
TemperatureOpt = Annotated[float, typer.Option(help="KL temperature")]
RelBatchOpt = Annotated[bool, typer.Option(
    help="RDist over the whole batch's image tokens at once (the reference) instead of per "
    "sample")]
# llava-mod's
ExpertsOpt = Annotated[int, typer.Option(help="llava-mod: experts per MoE layer")]
TopKOpt = Annotated[int, typer.Option(help="llava-mod: experts each token is routed to")]
MoeLayersOpt = Annotated[str, typer.Option(help="llava-mod: every-other, all, or 0,2,4")]
CeWeightOpt = Annotated[float, typer.Option(
    help="llava-mod sparse stage: weight of the CE term")]
AuxWeightOpt = Annotated[float, typer.Option(help="llava-mod: load-balance loss weight")]
PrefDataOpt = Annotated[Optional[Path], typer.Option(
    help="llava-mod pref stage: chosen/rejected pairs in RLAIF-V's layout (default: built from "
    "--data and the student's answers)")]
PrefLossOpt = Annotated[str, typer.Option(help="llava-mod: sigmoid (DPO) or kto_pair")]
BetaOpt = Annotated[float, typer.Option(help="llava-mod: the DPO beta")]
PrefLrOpt = Annotated[Optional[float], typer.Option(
    help="llava-mod pref stage lr (default lr/10)")]
ImageRootOpt = Annotated[Optional[Path], typer.Option(
    help=IMAGE_ROOT_HELP + "; --data and --pretrain-data alike")]
ResumeOpt = Annotated[bool, typer.Option(
    help="Continue OUT: skip finished stages, resume the unfinished one from its last "
    "checkpoint, with the settings it started with (a difference is refused)")]
OverwriteOpt = Annotated[bool, typer.Option(help="Redo every stage into an existing OUT")]


def distill_(
    teacher: TeacherOpt = ...,
    student: StudentOpt = ...,
    recipe: RecipeOpt = "llava-kd",
    data: DataOpt = None,
    out: OutOpt = ...,
    pretrain_data: PretrainDataOpt = None,
    stages: StagesOpt = None,
    steps: StepsOpt = 1000,
    batch_size: BatchSizeOpt = 16,
    lr: LrOpt = 1e-3,
    warmup: WarmupOpt = 50,
    save_every: SaveEveryOpt = 200,
    save_every_minutes: SaveMinutesOpt = None,
    seed: SeedOpt = 0,
    w_res: WResOpt = 1.0,
    w_vis: WVisOpt = 1.0,
    w_rel: WRelOpt = 1.0,
    temperature: TemperatureOpt = 1.0,
    rel_batch: RelBatchOpt = False,
    experts: ExpertsOpt = 4,
    top_k: TopKOpt = 2,
    moe_layers: MoeLayersOpt = "every-other",
    ce_weight: CeWeightOpt = 1.0,
    aux_weight: AuxWeightOpt = 0.01,
    pref_data: PrefDataOpt = None,
    pref_loss: PrefLossOpt = "sigmoid",
    beta: BetaOpt = 0.1,
    pref_lr: PrefLrOpt = None,
    max_length: MaxLengthOpt = None,
    long_samples: LongSamplesOpt = "truncate",
    image_root: ImageRootOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Distill a teacher into a student (LLaVA-KD: DPT, SFT, DFT; LLaVA-MoD: an MoE student by
    mimic and preference distillation); runs under accelerate."""
    quiet_libraries()
    from edgevlm.train import TrainConfig

    if recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "llava-mod" and pretrain_data is not None:
        raise UserError("--pretrain-data belongs to llava-kd's dpt stage; llava-mod distills on "
                        "--data (start from a student whose projector is trained, e.g. by "
                        "edgevlm train --stage pretrain)")
    if recipe == "llava-kd" and pref_data is not None:
        raise UserError("--pref-data belongs to --recipe llava-mod's pref stage")
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                        save_every=save_every, save_every_minutes=save_every_minutes, seed=seed,
                        max_length=max_length, long_samples=long_samples)
    opts = dict(image_root=image_root, resume=resume, overwrite=overwrite, quiet=quiet or as_json)
    if recipe == "llava-mod":
        from edgevlm.distill.mod import MOD_STAGES, ModConfig, distill_mod

        cfg = ModConfig(stages=stages or MOD_STAGES, train=train, pref_lr=pref_lr,
                        experts=experts, top_k=top_k, layers=moe_layers, ce_weight=ce_weight,
                        aux_weight=aux_weight, beta=beta, pref_loss=pref_loss)
        result = distill_mod(teacher, student, data, out, cfg, pref_data=pref_data, **opts)
    else:
        from edgevlm.distill import DistillConfig, distill

        cfg = DistillConfig(stages=stages or "dpt,sft,dft", train=train, w_res=w_res,
                            w_vis=w_vis, w_rel=w_rel, temperature=temperature,
                            rel_per_sample=not rel_batch)
        result = distill(teacher, student, data, out, cfg, pretrain_data=pretrain_data, **opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    summary("distill", _summary_rows(out, result), quiet, as_json)
    show_next(after_distill(out, result.final_dir, data), quiet, as_json)


def _summary_rows(out: Path, result) -> dict:
    """The closing table of either recipe's result (DistillResult or ModResult)."""
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
    return rows


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
