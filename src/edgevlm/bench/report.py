"""Bench reports: the numbers of `edgevlm bench`, the machine they were taken on, and the files.

A report directory holds bench.json (every figure, the machines, versions, the config),
bench.md (Markdown tables) and bench.png (accuracy against time to first token, marker area
proportional to disk size). `merge` joins reports taken on several devices into one, so
`edgevlm bench --compare phone/bench.json laptop/bench.json --report DIR` gives one table and
one plot. Torch-free; matplotlib is imported only to draw, and a missing matplotlib skips the
plot with a WARNING.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from edgevlm.bench.schema import check_report, read_json
from edgevlm.data.metrics import percent
from edgevlm.errors import UserError
from edgevlm.runtime.limits import machine_memory

log = logging.getLogger(__name__)
FILES = ("bench.json", "bench.md", "bench.png")


@dataclass(frozen=True)
class Spread:
    """Median and the 10th/90th percentiles of repeated measurements (nan ones left out)."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, values) -> Spread:
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
        if not v.size:
            return cls(math.nan, math.nan, math.nan, 0)
        p10, med, p90 = np.percentile(v, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), int(v.size))


@dataclass(frozen=True)
class Machine:
    label: str  # the host name; names the device in merged reports
    cpu: str
    logical_cores: int | None
    physical_cores: int | None
    ram_bytes: int | None
    os: str
    python: str
    versions: dict[str, str]  # numpy, onnxruntime; torch/transformers are per target


_SPREADS = ("ttft_s", "vision_s", "prefill_s", "decode_tokens_per_s", "preprocess_s")


@dataclass(frozen=True)
class TargetReport:
    """Everything measured for one target on one machine."""

    name: str
    path: str
    kind: str  # "export" | "model"
    backend: str  # "onnxruntime" | "transformers"
    provider: str
    precision: str
    threads: int | None
    accuracy: float
    correct: int
    total: int
    per_type: dict[str, float]
    ttft_s: Spread
    vision_s: Spread
    prefill_s: Spread
    decode_tokens_per_s: Spread
    preprocess_s: Spread
    n_prompt_tokens: int
    mean_new_tokens: float
    timed_runs: int
    load_s: float
    baseline_rss_bytes: int | None  # after importing the libraries, before loading weights
    loaded_rss_bytes: int | None
    peak_rss_bytes: int | None  # the target's own process, from start to end
    disk_bytes: int
    files: list[str]  # relative to `path`
    versions: dict[str, str]
    predictions: list[dict]
    device: str = ""  # Machine.label of the machine it ran on
    # what `edgevlm plan` compares (None in reports from before they were recorded)
    family: str = ""
    visual_tokens: int | None = None  # image tokens in the first timed prompt
    weight_bits: int | None = None  # the decoder's: 32, 16, 8 or 4

    @classmethod
    def from_dict(cls, d: dict, where: str = "bench result") -> TargetReport:
        optional = {"device", "family", "visual_tokens", "weight_bits"}
        missing = [f.name for f in fields(cls) if f.name not in d and f.name not in optional]
        if missing:
            raise UserError(f"{where}: a target lacks {', '.join(missing)}; it was not written "
                            "by `edgevlm bench` (or by an older version): re-run the bench")
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for k in _SPREADS:  # bench.json stores an empty spread's nan as null
            values[k] = Spread(**{f.name: math.nan if values[k][f.name] is None
                                  else values[k][f.name] for f in fields(Spread)})
        return cls(**values)

    def on_device(self, label: str) -> TargetReport:
        return replace(self, device=label)


@dataclass(frozen=True)
class BenchReport:
    created: str
    data: str
    n_samples: int
    config: dict
    machines: dict[str, Machine]
    targets: list[TargetReport]
    sources: list[str]  # the bench.json files a merged report was made from
    # A caveat every rendering shows beside the numbers (the demo's --quick: a smoke test)
    note: str = ""
    # The eval set's identity: sha256 of its samples' questions, answers and image bytes
    # (harness.eval_set_sha256); "" in reports from before it was recorded; a merged report of
    # several sets holds theirs joined by " | ".
    eval_sha256: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> BenchReport:
        """The report of bench.json's contents, after checking them against schema.REPORT (a
        UserError naming `where` and the field otherwise)."""
        check_report(d, where)
        names = {f.name for f in fields(Machine)}
        machines = {k: Machine(**{n: v for n, v in m.items() if n in names})
                    for k, m in d["machines"].items()}
        targets = [TargetReport.from_dict(t, where) for t in d["targets"]]
        return cls(d.get("created", ""), d.get("data", ""), d.get("n_samples", 0),
                   d.get("config", {}), machines, targets, d.get("sources", []),
                   d.get("note", ""), d.get("eval_sha256", ""))


def load_report(path: str | Path) -> BenchReport:
    """A bench.json (or the folder holding one), checked field by field (schema.py): bad
    input of any kind is one line naming the file, the field and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    if not path.is_file():
        raise UserError(f"bench report {path} does not exist; make it with "
                        "`edgevlm bench TARGET... --data EVAL.json --report DIR`")
    data = read_json(path)
    return BenchReport.from_dict(data, str(path))


def merge(reports: list[BenchReport], sources: list[str]) -> BenchReport:
    """One report from several (usually one per device). Devices sharing a host name are told
    apart as name#2, name#3."""
    if not reports:
        raise UserError("--compare needs at least one bench.json")
    machines: dict[str, Machine] = {}
    targets: list[TargetReport] = []
    for report in reports:
        rename = {}
        for label, m in report.machines.items():
            new, k = label, 2
            while new in machines:
                new, k = f"{label}#{k}", k + 1
            machines[new] = replace(m, label=new)
            rename[label] = new
        targets += [t.on_device(rename.get(t.device, t.device)) for t in report.targets]
    datas = sorted({r.data for r in reports})
    notes = list(dict.fromkeys(r.note for r in reports if r.note))
    # One set: its hash; several (or one unknown beside a known): all, which plan refuses.
    hashes = sorted({h for r in reports for h in (r.eval_sha256 or "none").split(" | ")})
    return BenchReport(created=max(r.created for r in reports), data=" | ".join(datas),
                       n_samples=max(r.n_samples for r in reports),
                       config=reports[0].config if len(reports) == 1 else {},
                       machines=machines, targets=targets, sources=list(sources),
                       note="; ".join(notes),
                       eval_sha256="" if hashes == ["none"] else " | ".join(hashes))


# -- the machine ------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            # x86: "model name"; Arm boards and phones: "Hardware" or "cpu model"
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def machine_info() -> Machine:
    import onnxruntime

    return Machine(label=platform.node() or "device", cpu=_cpu_name(),
                   logical_cores=os.cpu_count(), physical_cores=_physical_cores(),
                   ram_bytes=machine_memory(), os=platform.platform(),
                   python=platform.python_version(),
                   versions={"numpy": np.__version__, "onnxruntime": onnxruntime.__version__})


# -- writing ----------------------------------------------------------------------------------

def _ms(s: Spread) -> str:
    if not s.n:
        return "–"
    return f"{s.median * 1e3:.1f} ({s.p10 * 1e3:.1f}–{s.p90 * 1e3:.1f})"


def _rate(s: Spread) -> str:
    return f"{s.median:.1f} ({s.p10:.1f}–{s.p90:.1f})" if s.n else "–"


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def to_markdown(report: BenchReport) -> str:
    """The tables of bench.md: speed and size, accuracy per question type, the machines."""
    lines = [f"# edgevlm bench — {report.data} ({report.n_samples} samples)", ""]
    if report.note:
        lines += [f"**{report.note}**", ""]
    lines += ["Median (p10–p90) over the timed runs; TTFT includes preprocessing and the vision "
              "encoder; decode excludes the first token.", "",
              "| device | target | backend | precision | provider | threads | accuracy "
              "| TTFT ms | vision ms | prefill ms | decode tok/s | peak RSS MB (baseline) "
              "| disk MB |", "|" + "---|" * 13]
    for t in report.targets:
        lines.append(
            f"| {t.device} | {t.name} | {t.backend} | {t.precision} | {t.provider} "
            f"| {t.threads or 'default'} | {percent(t.accuracy)} ({t.correct}/{t.total}) "
            f"| {_ms(t.ttft_s)} | {_ms(t.vision_s)} | {_ms(t.prefill_s)} "
            f"| {_rate(t.decode_tokens_per_s)} "
            f"| {_mb(t.peak_rss_bytes)} ({_mb(t.baseline_rss_bytes)}) | {_mb(t.disk_bytes)} |")
    types = sorted({q for t in report.targets for q in t.per_type})
    if types:
        lines += ["", "## Accuracy per question type", "",
                  "| device | target | " + " | ".join(types) + " |",
                  "|---|---|" + "---|" * len(types)]
        for t in report.targets:
            cells = [percent(t.per_type[q]) if q in t.per_type else "–" for q in types]
            lines.append(f"| {t.device} | {t.name} | " + " | ".join(cells) + " |")
    lines += ["", "## Machines", "", "| device | cpu | cores (physical) | RAM GB | OS | python "
              "| versions |", "|---|---|---|---|---|---|---|"]
    for m in report.machines.values():
        versions = sorted({**m.versions, **{k: v for t in report.targets if t.device == m.label
                                            for k, v in t.versions.items()}}.items())
        ram = f"{m.ram_bytes / 1e9:.1f}" if m.ram_bytes else "–"
        lines.append(f"| {m.label} | {m.cpu} | {m.logical_cores} ({m.physical_cores or '–'}) "
                     f"| {ram} | {m.os} | {m.python} | "
                     + ", ".join(f"{k} {v}" for k, v in versions) + " |")
    if report.sources:
        lines += ["", "Merged from: " + ", ".join(report.sources)]
    if report.eval_sha256:
        lines += ["", f"Eval set sha256 (questions, answers, image bytes): {report.eval_sha256}"]
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> bool:
    """bench.png: accuracy against median TTFT, marker area ∝ disk size, one colour per device;
    False (and a WARNING) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: a device or CI has no display
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so %s was not drawn; pip install matplotlib",
                    path.name)
        return False
    devices = list(report.machines) or [""]
    colours = plt.get_cmap("tab10")
    largest = max((t.disk_bytes for t in report.targets), default=1) or 1
    fig, ax = plt.subplots(figsize=(8, 5.5))
    placed: list[tuple[float, float]] = []
    for t in report.targets:
        if not t.ttft_s.n:
            continue
        x, y = t.ttft_s.median * 1e3, 100 * t.accuracy
        c = colours(devices.index(t.device) % 10 if t.device in devices else 0)
        ax.errorbar(x, y, xerr=[[x - t.ttft_s.p10 * 1e3], [t.ttft_s.p90 * 1e3 - x]], fmt="none",
                    ecolor=c, alpha=0.5)
        ax.scatter(x, y, s=40 + 1200 * t.disk_bytes / largest, color=c, alpha=0.6,
                   edgecolors="black")
        label = f"{t.name} ({t.precision}, {t.disk_bytes / 1e6:.1f} MB)"
        # Points that (nearly) coincide, as precisions of one model often do, get their
        # labels stacked instead of printed over each other.
        near = sum(abs(math.log(x / px)) < 0.7 and abs(y - py) < 5 for px, py in placed)
        placed.append((x, y))
        ax.annotate(label + (f" @ {t.device}" if len(devices) > 1 else ""), (x, y),
                    textcoords="offset points", xytext=(8, 6 + 11 * near), fontsize=8)
    xs = [t.ttft_s.median for t in report.targets if t.ttft_s.n]
    if xs and max(xs) / max(min(xs), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("time to first token, ms (median; bars p10–p90)")
    ax.set_ylabel("accuracy, % (normalized exact match)")
    ax.set_ylim(-5, 105)
    # The note (a smoke test's) goes in the title: a plot is often looked at without its .md.
    ax.set_title("edgevlm bench: accuracy vs time to first token (marker area: disk size)"
                 + (f"\n{report.note}" if report.note else ""))
    ax.grid(alpha=0.3)
    if len(devices) > 1:
        for i, d in enumerate(devices):
            ax.scatter([], [], color=colours(i % 10), label=d)
        ax.legend(title="device", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _no_nan(value):
    """nan -> null: strict JSON readers (jq, JavaScript) reject NaN; a Spread with n=0 is the
    only place a nan can appear, and its n says it is empty."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def to_json(report: BenchReport) -> str:
    """bench.json's text: strict JSON (an empty spread's nan as null)."""
    return json.dumps(_no_nan(report.to_dict()), indent=1) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # a killed run never leaves half a file
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """Write bench.json, bench.md and (with matplotlib) bench.png into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--report {out} is a file; give a folder for bench.json/.md/.png")
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "bench.json", to_json(report))
    _write_text(out / "bench.md", to_markdown(report))
    written = [out / "bench.json", out / "bench.md"]
    if plot(report, out / "bench.png"):
        written.append(out / "bench.png")
    return written
