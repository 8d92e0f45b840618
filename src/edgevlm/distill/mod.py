"""LLaVA-MoD (Shu et al., ICLR 2025): a sparse MoE student taught by mimic, then preference
distillation, on the one training loop (edgevlm.train.run).

  dense     mimic, dense -> dense: the dense student learns the teacher's answer distribution;
            forward KL(teacher ‖ student) on the response tokens, no temperature, no CE;
            projector + LLM train
  upcycle   the dense student becomes sparse (edgevlm.models.moe.upcycle: experts on every other
            layer, each a copy of the dense FFN; no training, OUT/upcycle)
  sparse    mimic, dense -> sparse: KL + CE + 0.01 × load balance; FFNs and routers train,
            attention stays frozen
  pref      preference distillation: DPO (sigmoid, or kto_pair as LLaVA-MoD's script) with the
            sparse student as the policy and the dense teacher as the reference, β = 0.1,
            log-probabilities summed over the response tokens; FFNs and routers train

The response mask is the answer tokens' labels shifted by one (logits at i predict token i+1),
as edgevlm.distill.losses.response_kl does; LLaVA-MoD's code applies its mask unshifted, which
scores the KL one position early (the prompt's last token in, the answer's last token out).

Each stage writes OUT/<stage> atomically and the next starts from it, so resume and overwrite
behave as in the LLaVA-KD recipe (stages.py); OUT/final is the last stage's model.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgevlm.distill.checks import check_llava, check_pair, parse_stages
from edgevlm.distill.losses import response_kl
from edgevlm.distill.preference import (
    PREF_LOSSES,
    PairCollator,
    PreferenceLoss,
    build_pairs,
    fit_pairs,
    read_pairs,
)
from edgevlm.distill.stages import (
    StageLoop,
    StageResult,
    _barrier,
    _is_main_process,
    _jsonable,
    check_out,
    check_stage_training,
    frozen_logits,
    load_teacher,
)
from edgevlm.errors import UserError
from edgevlm.families import family_of
from edgevlm.models.moe import AUX_LOSS_WEIGHT, MoESpec, RouterLogits, is_moe, load_balance_loss
from edgevlm.train import TrainConfig

MOD_STAGES = ("dense", "upcycle", "sparse", "pref")
TRAIN_STAGE = {"dense": "sft", "sparse": "ffn", "pref": "ffn"}
# The loss settings each training stage's resume must match besides train.run's own (dense's
# loss has none: KL only).
LOSS_SETTINGS = {"dense": (), "sparse": ("ce_weight", "aux_weight"),
                 "pref": ("beta", "pref_loss")}


def _mod_training() -> TrainConfig:
    """ModConfig's default `train`: TrainConfig's defaults, but lr 1e-4."""
    return TrainConfig(lr=1e-4)


@dataclass(frozen=True)
class ModConfig:
    stages: tuple[str, ...] = MOD_STAGES
    # every training stage's: steps per stage, unless the stage's own count is given;
    # batch_size per process (pref: pairs); what trains and max_length are set per stage,
    # warmup is cut to a fifth of a stage's steps. lr 1e-4 by default here: a TrainConfig
    # given without lr has TrainConfig's own default, 1e-3
    train: TrainConfig = field(default_factory=_mod_training)
    dense_steps: int | None = None
    sparse_steps: int | None = None
    pref_steps: int | None = None
    pref_lr: float | None = None  # None: train.lr / 10 (DPO moves a trained model a little)
    experts: int = 4
    top_k: int = 2
    layers: str = "every-other"
    expert_init: str = "copy"  # "random": the no-upcycling control of the ablation
    ce_weight: float = 1.0  # sparse stage
    aux_weight: float = AUX_LOSS_WEIGHT
    beta: float = 0.1
    pref_loss: str = "sigmoid"

    def __post_init__(self):
        object.__setattr__(self, "stages", parse_stages(
            self.stages, MOD_STAGES, "dpt/sft/dft are --recipe llava-kd's"))
        check_stage_training(self.train)
        for name in ("dense_steps", "sparse_steps", "pref_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        for name in ("pref_lr", "beta"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise UserError(f"{name} must be positive, got {v}")
        for name in ("ce_weight", "aux_weight"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pref_loss not in PREF_LOSSES:
            raise UserError(f"--pref-loss {self.pref_loss!r} is not one of "
                            f"{', '.join(PREF_LOSSES)}")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top-k {self.top_k} must be between 1 and --experts "
                            f"{self.experts}")

    def stage_steps(self, stage: str) -> int:
        """A stage's steps; 0 for upcycle, which does not train."""
        if stage == "upcycle":
            return 0
        return getattr(self, f"{stage}_steps") or self.train.steps

    def stage_lr(self, stage: str) -> float:
        return (self.pref_lr or self.train.lr / 10) if stage == "pref" else self.train.lr

    @property
    def moe(self) -> MoESpec:
        return MoESpec(self.experts, self.top_k, self.layers, seed=self.train.seed,
                       init=self.expert_init)


class MimicLoss:
    """loss_fn for train.run: forward KL(teacher ‖ student) on the response tokens, plus
    `ce_weight` × the student's CE and, for an MoE student, `aux_weight` × the load-balance
    loss of its routers."""

    def __init__(self, teacher, ce_weight: float, aux_weight: float):
        self.teacher, self.ce_weight, self.aux_weight = teacher, ce_weight, aux_weight

    def __call__(self, model, batch):
        inner = getattr(model, "module", model)  # DDP / FSDP wrap the model under accelerate
        tc = inner.config.text_config
        sparse = is_moe(tc) and self.aux_weight > 0
        with RouterLogits(inner) if sparse else nullcontext() as routed:
            out = model(**batch)
        kd = response_kl(out.logits, frozen_logits(self.teacher, batch), batch["labels"])
        total, terms = kd, {"kd": kd.detach()}
        if self.ce_weight:
            total = total + self.ce_weight * out.loss
            terms["ce"] = out.loss.detach()
        if sparse:
            aux = load_balance_loss(routed.logits, tc.num_experts, tc.num_experts_per_tok,
                                    batch["attention_mask"])
            total = total + self.aux_weight * aux
            terms["aux"] = aux.detach()
        return total, terms


@dataclass
class ModResult:
    out_dir: Path
    final_dir: Path
    stages: list[StageResult]
    warnings: list[str]
    seconds: float
    pairs: dict = field(default_factory=dict)  # how the preference pairs were made


def distill_mod(teacher_dir, student_dir, data, out, cfg: ModConfig = ModConfig(),
                pref_data=None, image_root=None, resume: bool = False, overwrite: bool = False,
                quiet: bool = False) -> ModResult:
    """Run cfg.stages of LLaVA-MoD from the dense `student_dir`; write OUT/<stage>, OUT/final.

    `pref_data`: chosen/rejected pairs in RLAIF-V's layout; without it the pref stage builds
    its pairs from `data` and the sparse student's own answers (preference.build_pairs).
    """
    from edgevlm import train
    from edgevlm.data import fit_samples, load_samples
    from edgevlm.models import load_model

    t0, out = time.time(), Path(out)
    check_out(out, [teacher_dir, student_dir, data, pref_data], resume, overwrite)
    check_llava(teacher_dir, "teacher")
    _check_inputs(cfg.stages, check_llava(student_dir, "student"), data, pref_data)
    samples = load_samples(data, image_root) if data is not None else []
    pairs = read_pairs(pref_data, image_root) if pref_data is not None else None
    teacher = load_teacher(teacher_dir)
    student = load_model(student_dir)
    warnings = check_pair(teacher, student)
    collate = train.make_collator(student, cfg.train.max_length, cfg.train.long_samples,
                                  also=(teacher,))
    fitted = fit_samples(samples, collate, f"--data {data}", quiet) if samples else None
    pair_fit = fit_pairs(pairs, collate, f"--pref-data {pref_data}", quiet) if pairs else None
    del student
    loop, pair_counts = StageLoop(out, student_dir, resume, overwrite, quiet), {}
    for stage in loop.pending(cfg.stages, cfg.stage_steps):
        if stage == "upcycle":
            _upcycle(loop, cfg.moe)
            continue
        steps = cfg.stage_steps(stage)
        tcfg = replace(cfg.train, stage=TRAIN_STAGE[stage], steps=steps, lr=cfg.stage_lr(stage),
                       warmup=min(cfg.train.warmup, steps // 5 or 1),
                       max_length=collate.max_length)
        meta = {"recipe": "llava-mod", "stage": stage, "teacher": str(teacher_dir),
                "student": str(student_dir), "started_from": str(loop.src),
                **_jsonable(asdict(cfg))}
        policy = load_model(loop.src)
        match = {k: getattr(cfg, k) for k in LOSS_SETTINGS[stage]}
        if stage == "pref":
            if pair_fit is None:
                made, pair_counts = build_pairs(policy, fitted.samples, cfg.train.seed,
                                                quiet=quiet)
                pair_fit = fit_pairs(made, collate, f"pairs from --data {data}", quiet)
            else:
                pair_counts = {"file": len(pair_fit.samples)}
            meta["pairs"] = pair_counts
            loop.train(stage, policy, pair_fit.samples, tcfg,
                       PreferenceLoss(teacher.model, cfg.beta, cfg.pref_loss), meta, pair_fit,
                       batcher=PairCollator, settings=match)
        else:
            ce = 0.0 if stage == "dense" else cfg.ce_weight
            aux = cfg.aux_weight if stage == "sparse" else 0.0
            loop.train(stage, policy, samples, tcfg, MimicLoss(teacher.model, ce, aux), meta,
                       fitted, settings=match)
    final = loop.finish({"recipe": "llava-mod", "teacher": str(teacher_dir),
                         "student": str(student_dir), "config": _jsonable(asdict(cfg)),
                         "warnings": warnings, "pairs": pair_counts})
    return ModResult(out, final, loop.results, warnings, time.time() - t0, pair_counts)


def _check_inputs(stages: tuple[str, ...], student_cfg: dict, data, pref_data) -> None:
    """The stages fit the student (dense or already sparse) and have the data they need."""
    family = family_of(student_cfg)
    if not family.moe_text and ("upcycle" in stages or "sparse" in stages):
        raise UserError(f"LLaVA-MoD's student is a mixture of experts, and transformers has no "
                        f"mixture-of-experts decoder for a {family.name} model (its decoder is "
                        "its own M-RoPE Qwen2): use --recipe llava-kd for this family, or a llava "
                        "student")
    starts_sparse = is_moe(student_cfg.get("text_config", {}))
    if starts_sparse and ("dense" in stages or "upcycle" in stages):
        raise UserError("the student is already a mixture of experts; the dense and upcycle "
                        "stages need its dense parent (or run --stages sparse,pref)")
    if not starts_sparse and "upcycle" not in stages and {"sparse", "pref"} & set(stages):
        raise UserError("the sparse and pref stages train a mixture-of-experts student; keep "
                        "the upcycle stage in --stages or start from an upcycled model "
                        "(edgevlm moe-upcycle)")
    if data is None and {"dense", "sparse"} & set(stages):
        raise UserError("the dense and sparse stages distill on instruction data: pass --data")
    if "pref" in stages and data is None and pref_data is None:
        raise UserError("the pref stage needs --data (pairs are built from it) or --pref-data")


def _upcycle(loop: StageLoop, spec: MoESpec) -> None:
    """The upcycle stage: OUT/upcycle, the previous stage's model with MoE FFNs (no training),
    written once (by the main process)."""
    from edgevlm.atomic import atomic_dir
    from edgevlm.models import load_model, save_model
    from edgevlm.models.moe import upcycle

    s0, stage_out = time.time(), loop.out / "upcycle"
    if _is_main_process():
        with atomic_dir(stage_out, overwrite=True) as tmp:
            save_model(upcycle(load_model(loop.src), spec), tmp)
    _barrier()
    loop.results.append(StageResult("upcycle", stage_out, 0, None, time.time() - s0))
