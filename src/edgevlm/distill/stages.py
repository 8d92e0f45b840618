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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgevlm.data import FitReport, fit_samples, pixels_of
from edgevlm.distill.checks import STAGE_ORDER, check_llava, check_pair, parse_stages
from edgevlm.distill.losses import LossWeights, distill_terms
from edgevlm.errors import UserError
from edgevlm.train import TrainConfig

# Which of train.py's trainability rules each stage uses: DPT trains the projector only.
TRAIN_STAGE = {"dpt": "pretrain", "sft": "sft", "dft": "sft"}
DISTILLS = {"dpt": True, "sft": False, "dft": True}


@dataclass(frozen=True)
class DistillConfig:
    stages: tuple[str, ...] = STAGE_ORDER  # or "dpt,sft,dft"
    # every stage's training: steps per stage, unless the stage's own count is given; what
    # trains is set per stage; max_length None: min(1024, both models' max_position_embeddings)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpt_steps: int | None = None
    sft_steps: int | None = None
    dft_steps: int | None = None
    w_res: float = 1.0
    w_vis: float = 1.0
    w_rel: float = 1.0
    temperature: float = 1.0
    rel_per_sample: bool = True
    vocab_chunk: int = 8192

    def __post_init__(self):
        object.__setattr__(self, "stages", parse_stages(self.stages))
        check_stage_training(self.train)
        for name in ("dpt_steps", "sft_steps", "dft_steps", "vocab_chunk"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        for name in ("w_res", "w_vis", "w_rel"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0 (0 turns the term off), got "
                                f"{getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")

    def stage_steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps") or self.train.steps

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.w_res, self.w_vis, self.w_rel, self.temperature,
                           self.rel_per_sample, self.vocab_chunk)


def check_stage_training(train: TrainConfig) -> None:
    """A recipe's `train`: a TrainConfig whose stage and token count the recipe leaves alone
    (it sets what each stage trains; teacher and student see the same image tokens)."""
    if not isinstance(train, TrainConfig):
        raise UserError(f"train must be an edgevlm.train.TrainConfig, got {type(train).__name__}")
    if train.stage != TrainConfig.stage:
        raise UserError(f"train.stage {train.stage!r}: each distillation stage sets what it "
                        "trains; leave train.stage at its default")
    if train.visual_tokens is not None:
        raise UserError("train.visual_tokens: distillation matches the teacher's image tokens "
                        "one to one; reduce the distilled model's tokens afterwards (edgevlm "
                        "train --visual-tokens)")


def kd_loss_settings(cfg: DistillConfig) -> dict:
    """What a distilling stage's resume must match besides train.run's own settings, by the
    flags' names: the loss. vocab_chunk may change: it bounds memory, not the math."""
    return {"w_res": cfg.w_res, "w_vis": cfg.w_vis, "w_rel": cfg.w_rel,
            "temperature": cfg.temperature, "rel_batch": not cfg.rel_per_sample}


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
    from edgevlm.models import load_model

    t0, out = time.time(), Path(out)
    check_out(out, [teacher_dir, student_dir, data, pretrain_data], resume, overwrite)
    check_llava(teacher_dir, "teacher")
    check_llava(student_dir, "student")
    samples = _load_kd_data(cfg.stages, data, pretrain_data, image_root)
    teacher = load_teacher(teacher_dir)
    student = load_model(student_dir)
    warnings = check_pair(teacher, student)
    # Every data set measured under the limit both models can read, before any stage trains.
    collate = train.make_collator(student, cfg.train.max_length, cfg.train.long_samples,
                                  also=(teacher,))
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
    loop = StageLoop(out, student_dir, resume, overwrite, quiet)
    for stage in loop.pending(cfg.stages, cfg.stage_steps):
        tcfg = replace(cfg.train, stage=TRAIN_STAGE[stage], steps=cfg.stage_steps(stage),
                       max_length=collate.max_length)
        loss_fn = train.ce_loss
        if DISTILLS[stage] and teacher is not None:
            loss_fn = TeacherLoss(teacher.model, teacher.image_token_id, cfg.weights)
        meta = {"stage": stage, "teacher": str(teacher_dir), "student": str(student_dir),
                "started_from": str(loop.src), **_jsonable(asdict(cfg))}
        match = kd_loss_settings(cfg) if DISTILLS[stage] else {}
        loop.train(stage, load_model(loop.src), samples[stage], tcfg, loss_fn, meta,
                   fits[stage], settings=match)
    final = loop.finish({"teacher": str(teacher_dir), "student": str(student_dir),
                         "config": _jsonable(asdict(cfg)), "warnings": warnings,
                         "data": {k: f.to_dict() for k, f in fits.items() if k != "dft"}})
    return DistillResult(out, final, loop.results, warnings, time.time() - t0,
                         {k: f for k, f in fits.items() if k != "dft"})


def check_out(out: Path, inputs: list, resume: bool, overwrite: bool) -> None:
    """OUT exists only when resumed or overwritten, is a folder, and is none of the inputs."""
    from edgevlm.atomic import check_inputs

    # OUT itself is never deleted (each stage folder is replaced on its own, as an artifact),
    # but it must not be one of the inputs
    check_inputs(out, inputs)
    if out.exists() and not (resume or overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue it (finished stages "
                        "are kept), --overwrite to redo every stage, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")


def _load_kd_data(stages, data, pretrain_data, image_root) -> dict[str, list]:
    """Each stage's samples: captions for dpt, instructions for sft and dft."""
    from edgevlm.data import load_samples

    if "dpt" in stages and pretrain_data is None:
        raise UserError("stage dpt (distilled pre-training) needs captions: pass "
                        "--pretrain-data CAPTIONS.json, or drop dpt from --stages")
    samples = {}
    if "dpt" in stages:
        samples["dpt"] = load_samples(pretrain_data, image_root)
    if {"sft", "dft"} & set(stages):
        if data is None:
            raise UserError("stages sft and dft train on instruction data: pass --data DATA.json")
        samples["sft"] = samples["dft"] = load_samples(data, image_root)
    return samples


class StageLoop:
    """The stage loop of both recipes (LLaVA-KD here, LLaVA-MoD in mod.py).

    Each stage starts from the previous one's folder (the first from the student) and writes
    OUT/<stage>; a finished stage is kept and skipped unless `overwrite`, an unfinished one
    resumes from its last checkpoint under `resume`. `finish` writes OUT/final and
    OUT/distill.json.
    """

    def __init__(self, out: Path, student_dir, resume: bool, overwrite: bool, quiet: bool):
        self.out, self.src = Path(out), Path(student_dir)
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.results: list[StageResult] = []

    def pending(self, stages, steps_of):
        """Yield each stage to run, in order; `self.src` is then the folder it starts from and
        the caller records its StageResult (`train` does). A finished stage is recorded as
        skipped, of steps_of(stage) steps."""
        for stage in stages:
            stage_out = self.out / stage
            if stage_out.is_dir() and (stage_out / "config.json").is_file() and \
                    not self.overwrite:
                self.results.append(StageResult(stage, stage_out, steps_of(stage), None, 0.0,
                                                skipped=True))
            else:
                yield stage
                assert self.results and self.results[-1].stage == stage, \
                    f"stage {stage} ran and recorded no result"
            self.src = stage_out

    def train(self, stage: str, model, samples, cfg, loss_fn, meta: dict, fitted,
              batcher=None, settings: dict | None = None) -> None:
        """train.run from `model` into OUT/<stage>, with `meta` saved beside the model as
        distill_config.json; records the stage's result. A resumed stage continues its
        checkpoint only when `cfg`, the data and `settings` (the recipe's loss settings) are
        the checkpointed run's (checkpoints.check_resume)."""
        from edgevlm import train

        stage_out = self.out / stage
        r = train.run(model, samples, stage_out, cfg, loss_fn=loss_fn,
                      resume=self.resume and train.latest_checkpoint(stage_out) is not None,
                      overwrite=self.overwrite, quiet=self.quiet, label=stage,
                      extra_files={"distill_config.json": meta}, fitted=fitted,
                      batcher=batcher, also_match=settings)
        self.results.append(StageResult(stage, stage_out, r.steps, r.final_loss, r.seconds,
                                        resumed_from=r.resumed_from, history=r.history))

    def finish(self, report: dict) -> Path:
        """OUT/final = the last stage's model; OUT/distill.json = `report` and every stage's
        result. Returns OUT/final."""
        final = self.out / "final"
        if _is_main_process():
            _write_final(self.src, final)
            stages = [{k: v for k, v in _jsonable(asdict(r)).items() if k != "history"}
                      for r in self.results]
            (self.out / "distill.json").write_text(json.dumps({**report, "stages": stages},
                                                              indent=1))
        _barrier()
        return final


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
