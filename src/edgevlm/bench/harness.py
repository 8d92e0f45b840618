"""`bench(targets, data, BenchConfig(...))`: accuracy and speed of exports and model folders.

A TARGET is an export directory (edgevlm.json: run with this torch-free runtime) or a model
directory (config.json: the torch reference). The runtime does not know the torch reference: the
caller names its class as "module:Class" (`model_target`; the CLI passes the toolkit's), and only
the worker process that loads a model folder imports it. For each:

  accuracy   greedy answers to every sample (the first `limit`), normalized exact match,
             overall and per question type (runtime/metrics.py, as `edgevlm eval`)
  speed      `warmup` untimed answers, then `repeats` timed answers to each of the first
             `timing_samples` samples; median, p10 and p90 of time to first token, vision
             encode, prefill and decode tokens/s (the decode rate excludes the first token,
             which comes from the prefill pass)
  memory     each target runs in a fresh Python process, so one target's peak resident memory
             cannot hide another's; the process reports its peak (getrusage) and its resident
             memory after importing its libraries but before loading (the baseline)
  disk       bytes of the graphs the runtime loads (with their external data) or of the weights

Timings follow the runtime's `Timings` (runtime/model.py); the torch side measures the same
spans. Reports are written and merged by edgevlm.bench.report.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.bench.report import (
    BenchReport,
    Spread,
    TargetReport,
    machine_info,
)
from edgevlm.data.metrics import Score
from edgevlm.data.samples import Sample, load_samples, to_messages
from edgevlm.errors import UserError

PROGRESS_TAG = "@@edgevlm-bench "  # prefix of the worker's progress lines on its stdout

# Called as (target name, answers done, answers in all) while a target runs.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchConfig:
    """What `bench` measures; saved in bench.json beside the numbers it produced."""

    limit: int | None = None  # accuracy over the first N samples (None: all)
    warmup: int = 1  # untimed answers before the timed ones (sessions and caches warm up)
    repeats: int = 3  # timed answers to each timing sample
    max_new_tokens: int = 16
    provider: str = "auto"  # exports: auto|cpu|cuda|...; model folders: cpu, or cuda if there
    threads: int | None = None  # intra-op threads (None: the library's default)
    timing_samples: int = 4  # the first N samples are the fixed timing subset
    precision: str | None = None  # which graphs of an export (None: the manifest's)

    def __post_init__(self):
        from edgevlm.runtime.contract import PRECISIONS
        from edgevlm.runtime.session import SessionConfig

        for name, low in (("limit", 1), ("warmup", 0), ("repeats", 1), ("max_new_tokens", 1),
                          ("timing_samples", 1)):
            value = getattr(self, name)
            if value is None and name == "limit":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {value!r} must be an integer of at least {low}")
        SessionConfig(self.provider, self.threads)  # the runtime's own checks and messages
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is unknown; choose one of "
                            f"{', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Run:
    """One answer and where its time went, the same fields for both backends."""

    text: str
    n_new_tokens: int  # without the end-of-sequence token
    n_prompt_tokens: int  # after image-token expansion
    preprocess_s: float
    vision_s: float
    prefill_s: float
    ttft_s: float  # call start (preprocessing included) -> first token chosen
    decode_s: float
    decode_tokens_per_s: float  # nan when the answer stopped at its first token


def target_kind(path: str | Path) -> str:
    """"export" (has edgevlm.json) or "model" (has config.json), else a UserError."""
    path = Path(path)
    if (path / "edgevlm.json").is_file():
        return "export"
    if (path / "config.json").is_file():
        return "model"
    what = "does not exist" if not path.exists() else "has neither edgevlm.json nor config.json"
    raise UserError(f"bench target {path} {what}; give an export folder (made by `edgevlm "
                    "export`) or a model folder (a LLaVA checkpoint with config.json)")


WEIGHT_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}  # the decoder's, for the planner


class ExportTarget:
    """An export answered by the runtime (VLM), as an app on a device would run it."""

    backend = "onnxruntime"

    def __init__(self, path: Path, cfg: BenchConfig):
        from edgevlm.runtime.model import VLM

        self.vlm = VLM.load(path, cfg.provider, cfg.threads, cfg.precision)
        self.load_s = self.vlm.load_s
        self.provider = self.vlm.provider
        self.precision = self.vlm.info.precision

    def answer(self, sample: Sample, max_new_tokens: int) -> Run:
        # The sample's turns as chat messages, "<image>" in the first question, exactly the
        # prompt the torch reference renders (edgevlm.evaluate.prompt_text).
        messages = to_messages(sample.turns, with_last_answer=False)
        r = self.vlm.generate(sample.image, messages, max_new_tokens=max_new_tokens)
        t = r.timings
        return Run(r.text, t.n_new_tokens, t.n_prompt_tokens, t.preprocess_s, t.vision_s,
                   t.prefill_s, t.ttft_s, t.decode_s, t.decode_tokens_per_s)

    def files(self) -> list[Path]:
        """The graphs the session loaded and their external weights files."""
        info = self.vlm.info
        manifest = json.loads((info.root / "edgevlm.json").read_text(encoding="utf-8"))
        listed = {e.get("file"): e.get("external_data")
                  for e in (manifest.get("components") or {}).values() if isinstance(e, dict)}
        files = []
        for graph in info.graphs.values():
            files.append(graph)
            rel = graph.relative_to(info.root).as_posix()
            # The contract names external data <graph>.onnx_data; an older manifest may list
            # another name, so both are looked for.
            for data in {graph.with_name(graph.name + "_data"),
                         info.root / (listed.get(rel) or graph.name + "_data")}:
                if data.is_file():
                    files.append(data)
        return files

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def facts(self, sample: Sample) -> dict:
        """What the planner compares candidates by: family, image tokens in this sample's
        prompt (an Idefics3 image's count depends on its tiles), the decoder's weight bits."""
        from edgevlm.runtime.contract import COMPONENTS

        messages = to_messages(sample.turns, with_last_answer=False)
        ids = self.vlm._prepare(sample.image, messages, 0.0).ids
        decoder = COMPONENTS[-1]  # decoder_model_merged
        manifest = json.loads((self.vlm.info.root / "edgevlm.json").read_text(encoding="utf-8"))
        precision = ((manifest.get("components") or {}).get(decoder) or {}).get("precision")
        return {"family": self.vlm.info.family,
                "visual_tokens": int((ids == self.vlm.image_token_id).sum()),
                "weight_bits": WEIGHT_BITS.get(precision or self.precision)}


# -- the worker: one target, in its own process ---------------------------------------------------

def _proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (Linux) in bytes, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int | None:
    """Resident memory of this process now, in bytes."""
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int | None:
    """Peak resident memory of this process so far, in bytes. On Linux VmHWM, not getrusage:
    ru_maxrss survives exec, so a worker would report the larger parent it was forked from."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; others: KiB


def _load_class(spec: str):
    """"package.module:Class" -> the class."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def measure(path: Path, kind: str, samples: list[Sample], cfg: BenchConfig,
            progress: Callable[[int, int], None] = lambda done, total: None,
            model_target: str | None = None) -> dict:
    """Load one target and answer the samples (see the module docstring); a TargetReport's
    fields as a dict. Meant to run in a fresh process (`_worker`). `model_target`: the
    "module:Class" that loads a model folder."""
    factory = ExportTarget if kind == "export" else _load_class(model_target)
    baseline = rss_now()  # interpreter + libraries, before any weights
    target = factory(path, cfg)
    loaded = rss_now()
    timed = samples[: cfg.timing_samples]
    total = cfg.warmup + len(samples) + cfg.repeats * len(timed)
    done = 0

    def step(run: Run) -> Run:
        nonlocal done
        done += 1
        progress(done, total)
        return run

    for _ in range(cfg.warmup):
        step(target.answer(timed[0], cfg.max_new_tokens))
    score, predictions = Score(), []
    for s in samples:
        run = step(target.answer(s, cfg.max_new_tokens))
        ok = score.add(run.text, s.answer, s.type)
        predictions.append({"id": s.id, "type": s.type, "reference": s.answer,
                            "prediction": run.text, "correct": ok})
    runs = [step(target.answer(s, cfg.max_new_tokens))
            for _ in range(cfg.repeats) for s in timed]
    files = target.files()
    root = path.resolve()
    return {
        "name": path.name, "path": str(path), "kind": kind, "backend": target.backend,
        "provider": target.provider, "precision": target.precision, "threads": cfg.threads,
        "accuracy": score.accuracy, "correct": score.correct, "total": score.total,
        "per_type": score.type_accuracy(),
        **{k: asdict(Spread.of([getattr(r, k) for r in runs]))
           for k in ("ttft_s", "vision_s", "prefill_s", "decode_tokens_per_s", "preprocess_s")},
        "n_prompt_tokens": int(Spread.of([r.n_prompt_tokens for r in runs]).median),
        "mean_new_tokens": sum(r.n_new_tokens for r in runs) / len(runs),
        "timed_runs": len(runs), "load_s": target.load_s,
        "baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak_rss(),
        "disk_bytes": sum(f.stat().st_size for f in files),
        "files": [f.resolve().relative_to(root).as_posix() for f in files],
        "versions": target.versions(), "predictions": predictions,
        **target.facts(timed[0]),
    }


def _worker(spec_file: str) -> None:
    """Entry of the per-target process: read the spec, measure, write the result file."""
    spec = json.loads(Path(spec_file).read_text())

    def progress(done: int, total: int) -> None:
        print(PROGRESS_TAG + json.dumps([done, total]), flush=True)

    try:
        cfg = BenchConfig(**spec["config"])
        samples = load_samples(spec["data"], spec["image_root"])[: cfg.limit]
        payload = {"result": measure(Path(spec["path"]), spec["kind"], samples, cfg, progress,
                                     spec.get("model_target"))}
    except UserError as e:
        payload = {"error": str(e)}
    Path(spec["out"]).write_text(json.dumps(payload))


def _run_isolated(path: Path, kind: str, name: str, data: Path, image_root: Path | None,
                  cfg: BenchConfig, on_progress: ProgressFn | None,
                  model_target: str | None) -> TargetReport:
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as tmp:
        spec_file, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({
            "path": str(path), "kind": kind, "data": str(data), "out": str(out),
            "image_root": str(image_root) if image_root else None, "config": asdict(cfg),
            "model_target": model_target}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "edgevlm.bench.harness",
                                     str(spec_file)], stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=env)
            for line in proc.stdout:  # progress lines; anything else a library prints is dropped
                if line.startswith(PROGRESS_TAG) and on_progress is not None:
                    done, total = json.loads(line[len(PROGRESS_TAG):])
                    on_progress(name, done, total)
            proc.wait()
            err.seek(0)
            stderr = err.read()
        payload = json.loads(out.read_text()) if out.is_file() else {}
    if "error" in payload:
        raise UserError(payload["error"])
    if proc.returncode or "result" not in payload:
        raise RuntimeError(f"benchmarking {path} failed in its worker process (exit code "
                           f"{proc.returncode}):\n{stderr[-3000:]}")
    return TargetReport.from_dict({**payload["result"], "name": name})


# Folder names that say which stage wrote them, not which model they hold (`edgevlm distill`
# writes OUT/dpt, OUT/sft, OUT/dft and OUT/final): labelled with their parent.
_STAGE_NAMES = ("final", "dpt", "sft", "dft")


def _names(paths: Sequence[Path]) -> list[str]:
    """Short labels: the folder name, with its parent where two targets share a name or the
    name is only a distillation stage's."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(n) > 1 or n in _STAGE_NAMES else n
            for p, n in zip(paths, names)]


def bench(targets: Sequence[str | Path], data: str | Path, config: BenchConfig = BenchConfig(),
          image_root: str | Path | None = None, on_progress: ProgressFn | None = None,
          model_target: str | None = None) -> BenchReport:
    """Benchmark each target on `data` (LLaVA-format JSON); see the module docstring.
    model_target: "module:Class" of the torch reference that loads model folders (the CLI
    passes the toolkit's); without it only exports can be benchmarked."""
    if not targets:
        raise UserError("no bench target given; pass one or more export or model folders")
    paths = [Path(t) for t in targets]
    kinds = [target_kind(p) for p in paths]  # every target checked before minutes of work
    models = [p for p, k in zip(paths, kinds) if k == "model"]
    if models and model_target is None:
        raise UserError(f"{models[0]} is a model folder, which runs on the toolkit's torch "
                        "reference: benchmark it with `edgevlm bench` (pip install "
                        "'edgevlm[toolkit]'), or pass model_target='edgevlm.bench.torch_target:"
                        "TorchTarget' to bench()")
    data = Path(data)
    samples = load_samples(data, image_root)[: config.limit]  # bad data fails here
    eval_sha256 = eval_set_sha256(samples)
    image_root = Path(image_root) if image_root else None
    machine = machine_info()
    reports = [_run_isolated(p, k, n, data, image_root, config, on_progress, model_target)
               for p, k, n in zip(paths, kinds, _names(paths))]
    reports = [r.on_device(machine.label) for r in reports]
    return BenchReport(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), data=str(data),
                       n_samples=len(samples), config=asdict(config),
                       machines={machine.label: machine}, targets=reports, sources=[],
                       eval_sha256=eval_sha256)


def eval_set_sha256(samples: Sequence[Sample]) -> str:
    """What makes two reports' accuracies comparable: sha256 over each sample's questions and
    answers and its image's bytes, the samples' digests sorted (the order of a file does not
    change which questions it asks; ids and file names are labels, not content). Recorded in
    bench.json; `edgevlm plan` refuses reports whose hashes differ."""
    digests = []
    for s in samples:
        h = hashlib.sha256(json.dumps(s.turns, ensure_ascii=False).encode("utf-8"))
        h.update(b"\0text-only" if s.image is None else b"\0image\0")
        if s.image is not None:
            try:
                with open(s.image, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            except OSError as e:
                raise UserError(f"cannot read image {s.image} ({e.strerror or e}); fix or "
                                "remove that entry of the data file") from e
        digests.append(h.digest())
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


if __name__ == "__main__":
    # Through the package module, so the worker's classes are the ones the torch target imports.
    from edgevlm.bench.harness import _worker as worker

    worker(sys.argv[1])
