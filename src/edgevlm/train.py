"""The one training loop: LLaVA pretrain / SFT, and the distillation stages built on it.

Runs on Hugging Face accelerate, so `accelerate launch -m edgevlm.cli train ...` (or torchrun)
spreads it over processes, GPUs and nodes with no code of ours. The data order is a function
of (seed, step), so a run resumed from a checkpoint sees exactly the batches it would have
seen; checkpoints hold model, optimizer, scheduler and RNG state (accelerator.save_state).
A resume is exact only with the run's own settings: they are saved beside the checkpoints
(`resume_settings.json`) and a resume with other ones is refused, naming each difference.

Work happens in `.{OUT}.work/` beside OUT (checkpoints live there); OUT appears, complete, by
one rename at the end, so a killed run never leaves a half model that looks whole.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgevlm.atomic import work_dir
from edgevlm.checkpoints import (
    RESUME_SETTINGS,
    check_resume,
    checkpoint_due,
    latest_checkpoint,
    load_checkpoint,
    run_settings,
    save_checkpoint,
)
from edgevlm.data import (
    LONG_SAMPLES,
    Collator,
    FitReport,
    Sample,
    fit_samples,
    resolve_max_length,
)
from edgevlm.errors import UserError, check_seed
from edgevlm.families import part
from edgevlm.models import LoadedModel
from edgevlm.progress import Progress

log = logging.getLogger(__name__)

STAGES = ("pretrain", "sft", "ffn")


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"
    steps: int = 1000
    batch_size: int = 16  # per process
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    save_every: int = 200
    # also checkpoint when this many minutes passed since the last checkpoint, so a kill loses
    # at most that much work however long a step takes; None: by steps only
    save_every_minutes: float | None = None
    seed: int = 0
    train_vision: bool = False
    max_length: int | None = None  # tokens per sample; None: min(1024, max_position_embeddings)
    long_samples: str = "truncate"  # over max_length: "truncate" after the image, or "skip"
    workers: int = 0
    visual_tokens: int | None = None  # train at this many image tokens (models.token_reduce)
    token_select: str = "divprune"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UserError(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        check_save_minutes(self.save_every_minutes)
        check_seed(self.seed)
        check_length_options(self.max_length, self.long_samples)


def check_save_minutes(minutes) -> None:
    """--save-every-minutes: None, or a positive finite number of minutes."""
    if minutes is not None and (isinstance(minutes, bool)
                                or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise UserError(f"--save-every-minutes {minutes!r} must be a positive number of minutes "
                        "(e.g. 30); leave it out to checkpoint every --save-every steps only")


def check_length_options(max_length, long_samples) -> None:
    if max_length is not None and max_length < 1:
        raise UserError(f"--max-length must be at least 1, got {max_length}")
    if long_samples not in LONG_SAMPLES:
        raise UserError(f"--long-samples {long_samples!r} is not one of {', '.join(LONG_SAMPLES)}")


def make_collator(loaded: LoadedModel, max_length: int | None, long_samples: str,
                  also: tuple[LoadedModel, ...] = ()) -> Collator:
    """The training collator, its limit checked against the positions of the model and of
    `also` (a teacher that reads the same batches)."""
    limits = [getattr(m.model.config.text_config, "max_position_embeddings", None)
              for m in (loaded, *also)]
    positions = min((n for n in limits if n), default=None)
    return Collator(loaded.processor, loaded.num_image_tokens,
                    resolve_max_length(max_length, positions), long_samples)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    data: FitReport | None = None  # what was truncated or skipped to fit max_length


def _reduce_tokens(loaded: LoadedModel, cfg: TrainConfig) -> LoadedModel:
    """The model hooked to see cfg.visual_tokens image tokens (a model already trained at that
    count has the hook from load_model; another count is refused)."""
    from edgevlm.models import token_reduce

    current = token_reduce.setting(loaded.model.config)
    if current is None:
        return token_reduce.install(loaded, cfg.token_select, cfg.visual_tokens)
    if (current["method"], current["tokens"]) != (cfg.token_select, cfg.visual_tokens):
        raise UserError(f"the model was trained at {current['tokens']} visual tokens "
                        f"({current['method']}); train it further at that count, or start from "
                        "its full-token parent")
    return loaded


def set_trainable(model, stage: str, train_vision: bool = False) -> int:
    """Freeze all but what `stage` trains; returns the number of trainable parameters.

    pretrain (and distillation's DPT): the projector only. sft / dft: projector + language
    model (+ vision tower when asked). ffn (LLaVA-MoD's sparse stages): every decoder layer's
    feed-forward block, experts and routers included; attention, norms, embeddings, head and
    projector stay frozen.
    """
    model.requires_grad_(False)
    if stage == "ffn":
        for layer in part(model, "language_model").layers:
            layer.mlp.requires_grad_(True)
        parts = []
    else:
        parts = [part(model, "connector")]
    if stage not in ("pretrain", "ffn"):
        parts += [part(model, "language_model"), part(model, "lm_head")]
    if train_vision:
        parts.append(part(model, "vision_tower"))
    for p in parts:
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def image_params(model) -> list:
    """Trainable parameters a batch without images leaves out of the graph."""
    parts = (part(model, "connector"), part(model, "vision_tower"))
    return [p for m in parts for p in m.parameters() if p.requires_grad]


def ce_loss(model, batch) -> tuple:
    out = model(**batch)
    return out.loss, {"ce": out.loss.detach()}


def batch_indices(n: int, global_batch: int, seed: int, step: int) -> list[int]:
    """The sample indices of global batch `step`: epochs of seeded permutations, back to back."""
    import torch

    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(global_batch - len(out), n - offset)
        out += perm[offset: offset + take].tolist()
    return out


class StepBatches:
    """Batch sampler over steps [start, total): this process's share of each global batch."""

    def __init__(self, n, batch, world, rank, seed, start, total):
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.start, self.total = seed, start, total

    def __len__(self):
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            idx = batch_indices(self.n, self.batch * self.world, self.seed, step)
            yield idx[self.rank:: self.world]


def run(loaded: LoadedModel, samples: list[Sample], out: str | Path, cfg: TrainConfig,
        loss_fn: Callable = ce_loss, resume: bool = False, overwrite: bool = False,
        quiet: bool = False, extra_files: dict[str, dict] | None = None,
        label: str | None = None, fitted: FitReport | None = None,
        inputs: Sequence[str | Path | None] = (),
        batcher: Callable | None = None, also_match: dict | None = None,
        clock: Callable[[], float] = time.monotonic) -> TrainResult:
    """Train `loaded.model` on `samples` and write the trained model directory `out`.

    `label` names the run in the progress bar (default: the stage), e.g. distillation's "dft".
    Samples over cfg.max_length are truncated or skipped first (`fit_samples`); `fitted` is
    that done already (distillation checks every stage's data before the first trains).
    `batcher`: collator -> the DataLoader's collate_fn, for items that are not plain samples
    (preference pairs); `fitted` must then hold those items. A checkpoint is saved every
    cfg.save_every steps and, with cfg.save_every_minutes, when that long passed on `clock`
    (seconds) since the last one. `resume` continues the last checkpoint only when the run's
    settings (`run_settings`, with `also_match`: a caller's own, e.g. its loss weights) are
    the checkpointed run's.
    """
    import torch

    from edgevlm.atomic import check_new

    out = Path(out)
    check_new(out, overwrite, inputs)
    if not samples:
        raise UserError("the training data set is empty")
    data = _fit_data(loaded, samples, cfg, fitted, batcher, quiet)
    work = work_dir(out)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint in {work / 'checkpoints'}; run without "
                        "--resume to start from scratch")
    t = _setup(data.loaded.model, cfg, work, ckpt, run_settings(cfg, data.fitted, also_match))
    sampler = StepBatches(len(data.fitted.samples), cfg.batch_size, t.accel.num_processes,
                          t.accel.process_index, cfg.seed, t.start, cfg.steps)
    loader = torch.utils.data.DataLoader(data.fitted.samples, batch_sampler=sampler,
                                         collate_fn=data.collate, num_workers=cfg.workers)
    t0 = time.time()
    with Progress(f"{label or cfg.stage} ({t.n_train / 1e6:.2f}M trainable)", cfg.steps,
                  t.start, enabled=t.accel.is_main_process and not quiet,
                  unit="steps") as bar:
        history = _train_steps(t, loader, cfg, loss_fn, work, bar, clock)
    extra = {"train_data.json": data.fitted.to_dict(), **(extra_files or {}),
             "train_processes.json": {"distributed_type": str(t.accel.distributed_type),
                                      "num_processes": t.accel.num_processes}}
    _save(t, data.loaded, out, work, cfg, history, extra)
    loss_val = history[-1]["loss"] if history else float("nan")
    return TrainResult(out, cfg.steps, loss_val, time.time() - t0, t.start, history,
                       data.fitted)


@dataclass
class _TrainData:
    loaded: LoadedModel  # hooked to cfg.visual_tokens when asked
    fitted: FitReport  # .samples: what trains, cut to the collator's max_length
    collate: Callable  # the DataLoader's collate_fn


def _fit_data(loaded: LoadedModel, samples: list[Sample], cfg: TrainConfig,
              fitted: FitReport | None, batcher: Callable | None, quiet: bool) -> _TrainData:
    """The model, the samples fitted to cfg.max_length, and the batches' collate_fn."""
    if cfg.visual_tokens is not None:
        loaded = _reduce_tokens(loaded, cfg)
    collate = make_collator(loaded, cfg.max_length, cfg.long_samples)
    assert batcher is None or fitted is not None, "batcher items are fitted by the caller"
    if fitted is None:
        fitted = fit_samples(samples, collate, "the training data", quiet)
    assert (fitted.max_length, fitted.long_samples) == (collate.max_length, cfg.long_samples), \
        "fitted under other length settings"
    return _TrainData(loaded, fitted, batcher(collate) if batcher is not None else collate)


@dataclass
class _Trainer:
    """What the steps run on: the accelerator and what it prepared."""
    accel: object
    model: object  # wrapped by the accelerator (DDP / FSDP) when distributed
    opt: object
    sched: object
    params: list  # the trainable parameters
    image_params: list  # those a batch without images leaves out of the graph
    n_train: int  # trainable parameter count
    start: int  # the step the run starts at: 0, or the resumed checkpoint's


def _setup(model, cfg: TrainConfig, work: Path, ckpt: Path | None, settings: dict) -> _Trainer:
    """Accelerator, trainable parameters, optimizer and schedule; state from `ckpt` if given
    (and `settings` are the checkpointed run's), else a stale run's leftovers in `work` are
    removed and `settings` saved there for a resume to compare."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    gpu = torch.cuda.is_available()
    # cpu=True on a machine without GPUs makes torchrun / accelerate launch form a gloo group
    # (accelerate otherwise treats each CPU process as a lone run).
    accel = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu
                        and torch.cuda.is_bf16_supported() else "no")
    set_seed(cfg.seed)
    n_train = set_trainable(model, cfg.stage, cfg.train_vision)
    unused_without_image = image_params(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    model, opt, sched = accel.prepare(model, opt, sched)
    settings = {**settings, "processes": accel.num_processes}
    start = 0
    if ckpt is not None:
        check_resume(work, settings)
        start = load_checkpoint(accel, model, ckpt)
    elif accel.is_main_process:
        if work.exists():
            shutil.rmtree(work)  # a stale run's leftovers; we start from scratch
        work.mkdir(parents=True)
        (work / RESUME_SETTINGS).write_text(json.dumps(settings, indent=1))
    accel.wait_for_everyone()
    return _Trainer(accel, model, opt, sched, params, unused_without_image, n_train, start)


def _train_steps(t: _Trainer, loader, cfg: TrainConfig, loss_fn: Callable, work: Path, bar,
                 clock: Callable[[], float]) -> list[dict]:
    """Run the loader's steps, checkpointing as cfg asks; returns the loss history."""
    import torch

    accel, history, saved_at = t.accel, [], clock()
    for step, batch in enumerate(loader, start=t.start):
        batch = {k: v if v is None else v.to(accel.device) for k, v in batch.items()}
        with accel.autocast():
            loss, terms = loss_fn(t.model, batch)
        if batch["pixel_values"] is None and t.image_params:
            # A text-only batch leaves the projector out of the graph: a zero term keeps
            # it in, so DDP's reducer gets every gradient it waits for on each process and
            # a projector-only stage still has something to backward.
            loss = loss + 0.0 * sum(p.sum() for p in t.image_params)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step + 1}; lower --lr")
        accel.backward(loss)
        accel.clip_grad_norm_(t.params, 1.0)
        t.opt.step()
        t.sched.step()
        t.opt.zero_grad(set_to_none=True)
        terms = {k: float(accel.reduce(v.detach().float(), "mean")) for k, v in terms.items()}
        loss_val = float(accel.reduce(loss.detach().float(), "mean"))
        history.append({"step": step + 1, "loss": loss_val, **terms})
        bar.update(1, **terms)
        if step + 1 < cfg.steps and checkpoint_due(accel, step + 1, cfg, clock() - saved_at):
            save_checkpoint(accel, work, step + 1)
            saved_at = clock()
    return history


def _save(t: _Trainer, loaded: LoadedModel, out: Path, work: Path, cfg: TrainConfig,
          history: list[dict], extra_files: dict[str, dict]) -> None:
    """Write the trained model to OUT (on the main process), every process taking part."""
    t.accel.wait_for_everyone()
    # Every rank takes part: under FSDP this gathers the shards into one full state dict (on the
    # main process); under DDP or a single process it is the unwrapped model's own.
    state = t.accel.get_state_dict(t.model)
    if t.accel.is_main_process:
        _finish(t.accel.unwrap_model(t.model), loaded, out, work, cfg, history, extra_files,
                state)
    t.accel.wait_for_everyone()


def _schedule(cfg: TrainConfig):
    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return lr_at


def _finish(model, loaded, out: Path, work: Path, cfg, history, extra_files,
            state_dict: dict | None = None) -> None:
    from edgevlm.models import save_model

    model.eval()
    final = work / "model"
    if final.exists():
        shutil.rmtree(final)
    save_model(LoadedModel(model, loaded.processor, loaded.image_token_id,
                           loaded.num_image_tokens), final, state_dict)
    (final / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (final / "train_log.json").write_text(json.dumps(history))
    for name, obj in (extra_files or {}).items():
        (final / name).write_text(json.dumps(obj, indent=1))
    if out.exists():  # --overwrite: the old OUT goes only now that the new one is complete
        shutil.rmtree(out)
    final.rename(out)
    shutil.rmtree(work)
