"""`edgevlm demo`: the whole pipeline on the project's own data and tiny models, no download.

shapes data -> tiny teacher (init + SFT on questions and captions mixed) -> tiny student
distilled (LLaVA-KD DPT, SFT, DFT) -> quantized (Q-VLM W4) -> exported (int4 decoder, int8
vision) -> bench of the torch teacher, the torch student and the runtime on the export, side by
side -> plan: `edgevlm plan` picks among the three for a stated budget, time to first token at
most half the teacher's (as measured in this run) and peak memory at most 1 GB.

Every stage writes its own folder inside DIR (atomically), so a rerun skips each finished stage
and resumes at the first missing one. `--quick` uses small settings: a smoke test whose
accuracies mean nothing, which the summary, bench.md, bench.png and plan.png say.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgevlm.errors import UserError

if TYPE_CHECKING:
    from edgevlm.bench.report import BenchReport

SMOKE_NOTE = "smoke test (--quick): tiny settings, so these accuracies mean nothing"


@dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    n_train: int = 20000
    n_eval: int = 300
    teacher_steps: int = 1200
    teacher_lr: float = 5e-4
    distill_steps: tuple[int, int, int] = (300, 450, 450)  # dpt, sft, dft: row (e) of kd_ablation
    distill_lr: float = 1e-3
    batch_size: int = 32
    calib_samples: int = 64
    bench_limit: int | None = None

    def __post_init__(self):
        if self.n_train < 8 or self.n_eval < 4:
            raise UserError("the demo needs at least 8 training and 4 evaluation images")

    @classmethod
    def make(cls, quick: bool) -> DemoConfig:
        if not quick:
            return cls()
        return cls(quick=True, n_train=400, n_eval=40, teacher_steps=60, teacher_lr=1e-3,
                   distill_steps=(10, 20, 20), distill_lr=1e-3, batch_size=16,
                   calib_samples=8, bench_limit=20)

    @property
    def note(self) -> str:
        """What the bench and plan files say beside their numbers."""
        return SMOKE_NOTE if self.quick else ""


@dataclass
class DemoResult:
    out_dir: Path
    stages: dict[str, dict]  # stage -> {"dir", "seconds", "skipped"}
    bench: dict
    plan: dict  # plan.json: the budget, the chosen target and the Pareto front (or "error")

    @property
    def chosen(self) -> str | None:
        return (self.plan.get("chosen") or {}).get("name")

    def first_question(self) -> tuple[Path, str]:
        """The first eval image and its question: what the summary suggests `edgevlm run`
        answers next."""
        row = json.loads((self.out_dir / "data" / "eval.json").read_text())[0]
        question = row["conversations"][0]["value"].replace("<image>", "").strip()
        return self.out_dir / "data" / row["image"], question


def write_bench(report: BenchReport, report_dir: Path, cfg: DemoConfig) -> None:
    """The demo's bench.json, .md and .png, atomically; a --quick run's say, beside their
    numbers, that they come from a smoke test."""
    from edgevlm.atomic import atomic_dir
    from edgevlm.bench.report import write_report

    with atomic_dir(report_dir) as tmp:
        write_report(replace(report, note=cfg.note), tmp)


def _stage(name: str, path: Path, stages: dict, run, log) -> Path:
    """Run `run()` unless `path` (the stage's finished output) already exists."""
    if path.exists():
        stages[name] = {"dir": str(path), "seconds": 0.0, "skipped": True}
        log(f"[dim]{name}: done already ({path})[/dim]")
        return path
    log(f"[bold]{name}[/bold] -> {path}")
    t0 = time.time()
    run()
    stages[name] = {"dir": str(path), "seconds": round(time.time() - t0, 1), "skipped": False}
    return path


def _check_resumable(out: Path, cfg: DemoConfig) -> None:
    """A rerun resumes only a run of the same settings: a full demo over a --quick one would
    take the quick stages as done and show the smoke test as the full result."""
    saved = out / "demo_config.json"
    if saved.is_file():
        try:
            before = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{saved} is unreadable ({e}); remove {out} to start over") from e
        if before != json.loads(json.dumps(asdict(cfg))):
            kind = "--quick" if before.get("quick") else "the full"
            raise UserError(f"{out} holds a demo run made with {kind} settings; this run would "
                            "reuse its stages as if they were its own: choose another --out, or "
                            f"remove {out} to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} holds files that are not an edgevlm demo run (no "
                        "demo_config.json); choose another --out or an empty folder")


def run_demo(out: str | Path, cfg: DemoConfig, quiet: bool = False, log=print) -> DemoResult:
    from edgevlm.atomic import atomic_dir
    from edgevlm.data import shapes

    out = Path(out)
    _check_resumable(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    stages: dict[str, dict] = {}
    data = out / "data"

    def make_data():
        with atomic_dir(data) as tmp:
            shapes.generate(tmp, cfg.n_train, cfg.n_eval, seed=0)

    _stage("data", data, stages, make_data, log)
    teacher, student = _teacher_and_student(out, data, cfg, stages, quiet, log)
    exported = _compress(out, data, student, cfg, stages, quiet, log)
    report_dir, plan_dir = out / "report", out / "plan"
    _bench_and_plan(report_dir, plan_dir, [teacher, student, exported], data / "eval.json", cfg,
                    stages, log)
    (out / "demo_stages.json").write_text(json.dumps(stages, indent=1))
    return DemoResult(out, stages, json.loads((report_dir / "bench.json").read_text()),
                      json.loads((plan_dir / "plan.json").read_text()))


def _teacher_and_student(out: Path, data: Path, cfg: DemoConfig, stages: dict, quiet: bool,
                         log) -> tuple[Path, Path]:
    """Train the teacher, then distill the student from it (LLaVA-KD's three stages)."""
    from edgevlm import train as training
    from edgevlm.data import load_samples
    from edgevlm.distill import DistillConfig, distill
    from edgevlm.models import create, load_model

    train_json, pretrain_json = data / "train.json", data / "pretrain.json"
    teacher_init = out / "teacher-init"
    _stage("teacher init", teacher_init, stages, lambda: create(
        teacher_init, preset="tiny-teacher", tokenizer_data=[train_json, pretrain_json]), log)
    teacher = out / "teacher"
    tcfg = training.TrainConfig(stage="sft", steps=cfg.teacher_steps, lr=cfg.teacher_lr,
                                batch_size=cfg.batch_size, train_vision=True,
                                warmup=min(50, cfg.teacher_steps // 5 + 1))
    _stage("teacher train", teacher, stages, lambda: training.run(
        load_model(teacher_init), load_samples(train_json) + load_samples(pretrain_json), teacher,
        tcfg, quiet=quiet), log)

    student_init = out / "student-init"
    _stage("student init", student_init, stages, lambda: create(
        student_init, preset="tiny-student", tokenizer_from=teacher, vision_from=teacher), log)
    student_run = out / "student-distill"
    dpt, sft, dft = cfg.distill_steps
    dcfg = DistillConfig(dpt_steps=dpt, sft_steps=sft, dft_steps=dft, train=training.TrainConfig(
        lr=cfg.distill_lr, batch_size=cfg.batch_size, warmup=min(50, dpt // 5 + 1)))
    _stage("student distill", student_run / "final", stages, lambda: distill(
        teacher, student_init, train_json, student_run, dcfg, pretrain_data=pretrain_json,
        resume=True, quiet=quiet), log)
    return teacher, student_run / "final"


def _compress(out: Path, data: Path, student: Path, cfg: DemoConfig, stages: dict, quiet: bool,
              log) -> Path:
    """Q-VLM W4 on the student, then its int4 export; returns the export folder."""
    from edgevlm.export.exporter import ExportConfig, export
    from edgevlm.quant import QuantConfig, quantize

    quantized = out / "student-qvlm-w4"
    qcfg = QuantConfig(method="qvlm", bits=4, group_size=128, symmetric=True,
                       calib_samples=cfg.calib_samples)
    _stage("quantize", quantized, stages, lambda: quantize(
        student, quantized, qcfg, calib=data / "train.json", quiet=quiet), log)
    exported = out / "export"
    ecfg = ExportConfig(precision="int4", vision_precision="int8", embed_precision="int8",
                        block_size=128)
    _stage("export", exported, stages, lambda: export(quantized, exported, ecfg,
                                                       quiet=quiet), log)
    return exported


def _bench_and_plan(report_dir: Path, plan_dir: Path, targets: list[Path], eval_json: Path,
                    cfg: DemoConfig, stages: dict, log) -> None:
    """Bench the teacher, the student and the export; plan under half the teacher's TTFT."""
    from edgevlm.atomic import atomic_dir
    from edgevlm.bench.harness import BenchConfig, bench

    bcfg = BenchConfig(limit=cfg.bench_limit, warmup=1, repeats=1 if cfg.quick else 3,
                       max_new_tokens=8)

    def run_bench():
        write_bench(bench(targets, eval_json, bcfg,
                          model_target="edgevlm.bench.torch_target:TorchTarget"), report_dir, cfg)

    _stage("bench", report_dir, stages, run_bench, log)

    def run_plan():
        from edgevlm.bench import plan as planner
        from edgevlm.bench.report import load_report

        report = load_report(report_dir / "bench.json")
        teacher_ttft = next(t for t in report.targets if t.name == targets[0].name).ttft_s.median
        budget = {"max_ttft_ms": round(0.5 * 1e3 * teacher_ttft, 3), "max_memory_mb": 1024.0}
        with atomic_dir(plan_dir) as tmp:
            try:
                planner.write(planner.plan([report_dir / "bench.json"], **budget), tmp,
                              note=cfg.note)
            except UserError as e:  # a demo run records it and goes on; `edgevlm plan` stops
                (tmp / "plan.json").write_text(json.dumps({"budget": budget,
                                                           "error": str(e)}, indent=1))

    _stage("plan", plan_dir, stages, run_plan, log)
