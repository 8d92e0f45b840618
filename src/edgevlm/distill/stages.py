"""LLaVA-KD's three-stage scheme on the one training loop (edgevlm.train.run).

  DPT  distilled pre-training on captions: projector trainable; CE + MDist + RDist
  SFT  supervised fine-tuning on instructions: projector + LLM; CE only
  DFT  distilled fine-tuning from the SFT weights: projector + LLM; CE + MDist + RDist

Each stage writes the model directory OUT/<stage> (atomically, through train.run), then the
next stage starts from it, so a later failure never loses a finished stage, and a rerun with
`resume=True` skips finished stages and resumes the unfinished one from its last checkpoint.
OUT/final is the last stage's model. The teacher is frozen, in eval mode, run without
gradients on the very batch the student sees (bf16/fp16 on a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgevlm.data import FitReport, fit_samples, pixels_of
from edgevlm.distill.checks import STAGE_ORDER, check_llava, check_pair, parse_stages
from edgevlm.distill.losses import LossWeights, distill_terms
from edgevlm.errors import UserError, check_seed
from edgevlm.train import check_length_options, check_save_minutes

# Which of train.py's trainability rules each stage uses: DPT trains the projector only.
TRAIN_STAGE = {"dpt": "pretrain", "sft": "sft", "dft": "sft"}
DISTILLS = {"dpt": True, "sft": False, "dft": True}


@dataclass(frozen=True)
class DistillConfig:
    stages: tuple[str, ...] = STAGE_ORDER  # or "dpt,sft,dft"
    steps: int = 1000  # per stage, unless the stage's own count is given
    dpt_steps: int | None = None
    sft_steps: int | None = None
    dft_steps: int | None = None
    batch_size: int = 16  # per process
    lr: float = 1e-3
    warmup: int = 50
    save_every: int = 200
    save_every_minutes: float | None = None  # also checkpoint by time (TrainConfig's)
    seed: int = 0
    w_res: float = 1.0
    w_vis: float = 1.0
    w_rel: float = 1.0
    temperature: float = 1.0
    rel_per_sample: bool = True
    vocab_chunk: int = 8192
    max_length: int | None = None  # None: min(1024, the models' max_position_embeddings)
    long_samples: str = "truncate"  # over max_length: "truncate" after the image, or "skip"

    def __post_init__(self):
        object.__setattr__(self, "stages", parse_stages(self.stages))
        check_seed(self.seed)
        check_save_minutes(self.save_every_minutes)
        for name in ("steps", "dpt_steps", "sft_steps", "dft_steps", "batch_size", "save_every",
                     "vocab_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        for name in ("w_res", "w_vis", "w_rel"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0 (0 turns the term off), got "
                                f"{getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        check_length_options(self.max_length, self.long_samples)

    def stage_steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps") or self.steps

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.w_res, self.w_vis, self.w_rel, self.temperature,
                           self.rel_per_sample, self.vocab_chunk)


@dataclass
class StageResult:
    stage: str
    out_dir: Path
    steps: int
    final_loss: float | None  # None when skipped
    seconds: float
    skipped: bool = False
    resumed_from: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class DistillResult:
    out_dir: Path
    final_dir: Path
    stages: list[StageResult]
    warnings: list[str]
    seconds: float
    data: dict[str, FitReport] = field(default_factory=dict)  # "dpt" / "sft": what was cut


def frozen_logits(model, batch: dict):
    """(B, S, V) logits of a frozen model (a teacher, a DPO reference) on the batch the student
    sees, without gradients; the model goes to the batch's device on first use (train.run owns
    device placement)."""
    import torch

    device = batch["input_ids"].device
    if next(model.parameters()).device != device:
        model.to(device)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     **pixels_of(batch, model.dtype)).logits


class TeacherLoss:
    """loss_fn for train.run: the student's CE plus the distillation terms against the teacher.

    The teacher goes to the batch's device on first use (train.run owns device placement).
    """

    def __init__(self, teacher, image_token_id: int, weights: LossWeights):
        self.teacher, self.image_token_id, self.weights = teacher, image_token_id, weights

    def __call__(self, model, batch):
        out = model(**batch)
        if not self.weights.uses_teacher:
            return out.loss, {"ce": out.loss.detach()}
        t_logits = frozen_logits(self.teacher, batch)
        return distill_terms(out.loss, out.logits, t_logits, batch, self.image_token_id,
                             self.weights)


def teacher_dtype():
    """bf16 (or fp16) inference on a GPU, fp32 on CPU where half matmuls are slow."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_teacher(teacher_dir):
    from edgevlm.models import load_model

    teacher = load_model(teacher_dir, dtype=teacher_dtype())
    teacher.model.requires_grad_(False)
    teacher.model.eval()
    return teacher


def distill(teacher_dir, student_dir, data, out, cfg: DistillConfig = DistillConfig(),
            pretrain_data=None, image_root=None, resume: bool = False, overwrite: bool = False,
            quiet: bool = False) -> DistillResult:
    """Distill `teacher_dir` into `student_dir` through cfg.stages; write OUT/<stage>, OUT/final.

    Everything that can be checked is checked before any training starts.
    """
    from edgevlm import train
    from edgevlm.atomic import check_inputs
    from edgevlm.data import load_samples
    from edgevlm.models import load_model

    t0, out = time.time(), Path(out)
    # OUT itself is never deleted (each stage folder is replaced on its own, as an artifact),
    # but it must not be one of the inputs
    check_inputs(out, [teacher_dir, student_dir, data, pretrain_data])
    if out.exists() and not (resume or overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue it (finished stages "
                        "are kept), --overwrite to redo every stage, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    check_llava(teacher_dir, "teacher")
    check_llava(student_dir, "student")
    if "dpt" in cfg.stages and pretrain_data is None:
        raise UserError("stage dpt (distilled pre-training) needs captions: pass "
                        "--pretrain-data CAPTIONS.json, or drop dpt from --stages")
    samples = {}
    if "dpt" in cfg.stages:
        samples["dpt"] = load_samples(pretrain_data, image_root)
    if {"sft", "dft"} & set(cfg.stages):
        if data is None:
            raise UserError("stages sft and dft train on instruction data: pass --data DATA.json")
        samples["sft"] = samples["dft"] = load_samples(data, image_root)
    teacher = load_teacher(teacher_dir)
    student = load_model(student_dir)
    warnings = check_pair(teacher, student)
    # Every data set measured under the limit both models can read, before any stage trains.
    collate = train.make_collator(student, cfg.max_length, cfg.long_samples, also=(teacher,))
    fits = {}
    if "dpt" in samples:
        fits["dpt"] = fit_samples(samples["dpt"], collate, f"--pretrain-data {pretrain_data}",
                                  quiet)
    if "sft" in samples:
        fits["sft"] = fits["dft"] = fit_samples(samples["sft"], collate, f"--data {data}",
                                                quiet)
    del student
    if not any(DISTILLS[s] for s in cfg.stages) or not cfg.weights.uses_teacher:
        teacher = None  # no stage needs its logits; free the memory
    results, src = [], Path(student_dir)
    for stage in cfg.stages:
        stage_out = out / stage
        if stage_out.is_dir() and (stage_out / "config.json").is_file() and not overwrite:
            results.append(StageResult(stage, stage_out, cfg.stage_steps(stage), None, 0.0,
                                       skipped=True))
            src = stage_out
            continue
        tcfg = train.TrainConfig(stage=TRAIN_STAGE[stage], steps=cfg.stage_steps(stage),
                                 batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
                                 save_every=cfg.save_every,
                                 save_every_minutes=cfg.save_every_minutes, seed=cfg.seed,
                                 max_length=collate.max_length,
                                 long_samples=cfg.long_samples)
        loss_fn = train.ce_loss
        if DISTILLS[stage] and teacher is not None:
            loss_fn = TeacherLoss(teacher.model, teacher.image_token_id, cfg.weights)
        meta = {"stage": stage, "teacher": str(teacher_dir), "student": str(student_dir),
                "started_from": str(src), **_jsonable(asdict(cfg))}
        r = train.run(load_model(src), samples[stage], stage_out, tcfg, loss_fn=loss_fn,
                      resume=resume and train.latest_checkpoint(stage_out) is not None,
                      overwrite=overwrite, quiet=quiet, label=stage,
                      extra_files={"distill_config.json": meta}, fitted=fits[stage])
        results.append(StageResult(stage, stage_out, r.steps, r.final_loss, r.seconds,
                                   resumed_from=r.resumed_from, history=r.history))
        src = stage_out
    final = out / "final"
    if _is_main_process():
        _write_final(src, final)
        report = {"teacher": str(teacher_dir), "student": str(student_dir),
                  "config": _jsonable(asdict(cfg)), "warnings": warnings,
                  "data": {k: f.to_dict() for k, f in fits.items() if k != "dft"},
                  "stages": [{k: v for k, v in _jsonable(asdict(r)).items() if k != "history"}
                             for r in results]}
        (out / "distill.json").write_text(json.dumps(report, indent=1))
    _barrier()
    return DistillResult(out, final, results, warnings, time.time() - t0,
                         {k: f for k, f in fits.items() if k != "dft"})


def _write_final(src: Path, final: Path) -> None:
    """OUT/final = the last stage's model; hard links when possible so no weights are copied."""
    from edgevlm.atomic import atomic_dir

    with atomic_dir(final, overwrite=True) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp, copy_function=_link_or_copy)


def _link_or_copy(a, b):
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
