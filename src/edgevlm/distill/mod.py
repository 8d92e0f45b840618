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

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
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
    StageResult,
    _barrier,
    _is_main_process,
    _jsonable,
    _write_final,
    frozen_logits,
    load_teacher,
)
from edgevlm.errors import UserError, check_seed
from edgevlm.models.moe import AUX_LOSS_WEIGHT, MoESpec, RouterLogits, is_moe, load_balance_loss
from edgevlm.train import check_length_options, check_save_minutes

MOD_STAGES = ("dense", "upcycle", "sparse", "pref")
TRAIN_STAGE = {"dense": "sft", "sparse": "ffn", "pref": "ffn"}


@dataclass(frozen=True)
class ModConfig:
    stages: tuple[str, ...] = MOD_STAGES
    steps: int = 1000  # per training stage, unless its own count is given
    dense_steps: int | None = None
    sparse_steps: int | None = None
    pref_steps: int | None = None
    batch_size: int = 16  # per process; pref: pairs per process
    lr: float = 1e-4
    pref_lr: float | None = None  # None: lr / 10 (DPO moves a trained model a little)
    warmup: int = 50
    save_every: int = 200
    save_every_minutes: float | None = None  # also checkpoint by time (TrainConfig's)
    seed: int = 0
    experts: int = 4
    top_k: int = 2
    layers: str = "every-other"
    expert_init: str = "copy"  # "random": the no-upcycling control of the ablation
    ce_weight: float = 1.0  # sparse stage
    aux_weight: float = AUX_LOSS_WEIGHT
    beta: float = 0.1
    pref_loss: str = "sigmoid"
    max_length: int | None = None
    long_samples: str = "truncate"

    def __post_init__(self):
        object.__setattr__(self, "stages", parse_stages(
            self.stages, MOD_STAGES, "dpt/sft/dft are --recipe llava-kd's"))
        check_seed(self.seed)
        check_save_minutes(self.save_every_minutes)
        for name in ("steps", "dense_steps", "sparse_steps", "pref_steps", "batch_size",
                     "save_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        for name in ("lr", "pref_lr", "beta"):
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
        check_length_options(self.max_length, self.long_samples)

    def stage_steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps") or self.steps

    def stage_lr(self, stage: str) -> float:
        return (self.pref_lr or self.lr / 10) if stage == "pref" else self.lr

    @property
    def moe(self) -> MoESpec:
        return MoESpec(self.experts, self.top_k, self.layers, seed=self.seed,
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
    from edgevlm.atomic import atomic_dir, check_inputs
    from edgevlm.data import fit_samples, load_samples
    from edgevlm.models import load_model, save_model
    from edgevlm.models.moe import upcycle

    t0, out = time.time(), Path(out)
    check_inputs(out, [teacher_dir, student_dir, data, pref_data])
    if out.exists() and not (resume or overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue it (finished stages "
                        "are kept), --overwrite to redo every stage, or choose another --out")
    check_llava(teacher_dir, "teacher")
    student_cfg = check_llava(student_dir, "student")
    starts_sparse = is_moe(student_cfg.get("text_config", {}))
    if starts_sparse and ("dense" in cfg.stages or "upcycle" in cfg.stages):
        raise UserError("the student is already a mixture of experts; the dense and upcycle "
                        "stages need its dense parent (or run --stages sparse,pref)")
    if not starts_sparse and "upcycle" not in cfg.stages and (
            {"sparse", "pref"} & set(cfg.stages)):
        raise UserError("the sparse and pref stages train a mixture-of-experts student; keep "
                        "the upcycle stage in --stages or start from an upcycled model "
                        "(edgevlm moe-upcycle)")
    if data is None and {"dense", "sparse"} & set(cfg.stages):
        raise UserError("the dense and sparse stages distill on instruction data: pass --data")
    if "pref" in cfg.stages and data is None and pref_data is None:
        raise UserError("the pref stage needs --data (pairs are built from it) or --pref-data")
    samples = load_samples(data, image_root) if data is not None else []
    pairs = read_pairs(pref_data, image_root) if pref_data is not None else None
    teacher = load_teacher(teacher_dir)
    student = load_model(student_dir)
    warnings = check_pair(teacher, student)
    collate = train.make_collator(student, cfg.max_length, cfg.long_samples, also=(teacher,))
    fitted = fit_samples(samples, collate, f"--data {data}", quiet) if samples else None
    pair_fit = fit_pairs(pairs, collate, f"--pref-data {pref_data}", quiet) if pairs else None
    del student
    results, src, pair_counts = [], Path(student_dir), {}
    for stage in cfg.stages:
        stage_out = out / stage
        done = stage_out.is_dir() and (stage_out / "config.json").is_file() and not overwrite
        if done:
            results.append(StageResult(stage, stage_out, 0 if stage == "upcycle"
                                       else cfg.stage_steps(stage), None, 0.0, skipped=True))
            src = stage_out
            continue
        if stage == "upcycle":
            s0 = time.time()
            if _is_main_process():
                with atomic_dir(stage_out, overwrite=True) as tmp:
                    save_model(upcycle(load_model(src), cfg.moe), tmp)
            _barrier()
            results.append(StageResult(stage, stage_out, 0, None, time.time() - s0))
            src = stage_out
            continue
        tcfg = train.TrainConfig(stage=TRAIN_STAGE[stage], steps=cfg.stage_steps(stage),
                                 batch_size=cfg.batch_size, lr=cfg.stage_lr(stage),
                                 warmup=min(cfg.warmup, cfg.stage_steps(stage) // 5 or 1),
                                 save_every=cfg.save_every,
                                 save_every_minutes=cfg.save_every_minutes, seed=cfg.seed,
                                 max_length=collate.max_length, long_samples=cfg.long_samples)
        meta = {"recipe": "llava-mod", "stage": stage, "teacher": str(teacher_dir),
                "student": str(student_dir), "started_from": str(src),
                **_jsonable(asdict(cfg))}
        policy = load_model(src)
        if stage == "pref":
            if pair_fit is None:
                made, pair_counts = build_pairs(policy, fitted.samples, cfg.seed, quiet=quiet)
                pair_fit = fit_pairs(made, collate, f"pairs from --data {data}", quiet)
            else:
                pair_counts = {"file": len(pair_fit.samples)}
            meta["pairs"] = pair_counts
            loss_fn = PreferenceLoss(teacher.model, cfg.beta, cfg.pref_loss)
            r = train.run(policy, pair_fit.samples, stage_out, tcfg, loss_fn=loss_fn,
                          resume=resume and train.latest_checkpoint(stage_out) is not None,
                          overwrite=overwrite, quiet=quiet, label=stage,
                          extra_files={"distill_config.json": meta}, fitted=pair_fit,
                          batcher=PairCollator)
        else:
            ce = 0.0 if stage == "dense" else cfg.ce_weight
            aux = cfg.aux_weight if stage == "sparse" else 0.0
            r = train.run(policy, samples, stage_out, tcfg,
                          loss_fn=MimicLoss(teacher.model, ce, aux),
                          resume=resume and train.latest_checkpoint(stage_out) is not None,
                          overwrite=overwrite, quiet=quiet, label=stage,
                          extra_files={"distill_config.json": meta}, fitted=fitted)
        results.append(StageResult(stage, stage_out, r.steps, r.final_loss, r.seconds,
                                   resumed_from=r.resumed_from, history=r.history))
        src = stage_out
    final = out / "final"
    if _is_main_process():
        _write_final(src, final)
        report = {"recipe": "llava-mod", "teacher": str(teacher_dir),
                  "student": str(student_dir), "config": _jsonable(asdict(cfg)),
                  "warnings": warnings, "pairs": pair_counts,
                  "stages": [{k: v for k, v in _jsonable(asdict(r)).items() if k != "history"}
                             for r in results]}
        (out / "distill.json").write_text(json.dumps(report, indent=1))
    _barrier()
    return ModResult(out, final, results, warnings, time.time() - t0, pair_counts)
