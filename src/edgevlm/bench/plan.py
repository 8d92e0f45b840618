"""`edgevlm plan`: pick the most accurate export that fits a device budget, from measured bench
reports only.

Every target of every report is a candidate point: accuracy, time to first token with an image
(median), peak resident memory of its process, disk size, and the facts the report carries
(family, image tokens, decoder weight bits). The Pareto front is the set of points no other
point beats on accuracy without being slower or larger (accuracy up, TTFT and memory down).
Within the budget the planner picks the most accurate point (ties: the faster, then the
smaller); it never interpolates between points or extrapolates past them. A budget no point
meets is an error that lists the closest points, by how far over the budget each is.

Reports must come from one eval set: the same hash of its questions, answers and image bytes
(harness.eval_set_sha256), sample count and question ids; mixing them would compare accuracies
on different questions. Reports from before the hash was recorded are compared by what they
carry (data file name, sample count, question ids), with a WARNING, listed in the plan, that
their questions and images were not compared: refusing them would make a user re-measure
every device a report came from, and the check they predate still catches another file or
--limit.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.bench.report import BenchReport, load_report
from edgevlm.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str  # the bench.json it came from
    device: str
    kind: str  # export | model
    accuracy: float
    ttft_ms: float
    memory_mb: float | None  # peak RSS of the target's process
    disk_mb: float
    family: str
    visual_tokens: int | None
    weight_bits: int | None

    def over(self, max_ttft_ms: float | None, max_memory_mb: float | None) -> float:
        """How far past the budget, as the largest relative excess (0: inside it)."""
        excess = 0.0
        if max_ttft_ms is not None:
            excess = max(excess, self.ttft_ms / max_ttft_ms - 1)
        if max_memory_mb is not None and self.memory_mb is not None:
            excess = max(excess, self.memory_mb / max_memory_mb - 1)
        # A number that is not one is outside every budget (reports are checked on reading,
        # schema.py; this keeps a Candidate built by hand from slipping through max()).
        return excess if math.isfinite(excess) else math.inf


@dataclass(frozen=True)
class Plan:
    budget: dict
    candidates: list[Candidate]
    front: list[Candidate]  # by accuracy, best first
    chosen: Candidate
    warnings: tuple[str, ...] = ()  # what was not checked (reports without an eval-set hash)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "chosen": asdict(self.chosen),
                "front": [asdict(c) for c in self.front],
                "candidates": [asdict(c) for c in self.candidates],
                "warnings": list(self.warnings)}


def candidates(paths: list[str | Path]) -> list[Candidate]:
    """Every target of the reports, after checking they share one eval set."""
    return _candidates(paths)[0]


def _candidates(paths: list[str | Path]) -> tuple[list[Candidate], list[str]]:
    """candidates(), and the warnings about what could not be checked."""
    if not paths:
        raise UserError("give the bench reports to plan from: --reports a/bench.json "
                        "b/bench.json (each written by `edgevlm bench --report DIR`)")
    reports: list[tuple[Path, BenchReport]] = [(Path(p), load_report(p)) for p in paths]
    warnings = _one_eval_set(reports)
    out = []
    for path, report in reports:
        for t in report.targets:
            out.append(Candidate(
                t.name, str(path), t.device, t.kind, t.accuracy, 1e3 * t.ttft_s.median,
                None if t.peak_rss_bytes is None else t.peak_rss_bytes / 2**20,
                t.disk_bytes / 2**20, t.family, t.visual_tokens, t.weight_bits))
    if not out:
        which = f"{paths[0]} holds" if len(paths) == 1 else "the reports hold"
        raise UserError(f"{which} no measured targets; bench the candidate exports first "
                        "(`edgevlm bench EXPORT... --data EVAL.json --report DIR`)")
    return out, warnings


def _ids(report: BenchReport) -> tuple:
    return tuple(sorted({p["id"] for t in report.targets for p in t.predictions}))


def _one_eval_set(reports: list[tuple[Path, BenchReport]]) -> list[str]:
    """Refuse reports of different eval sets (see the module docstring); the warnings for
    reports without the eval-set hash, when there is another report to compare them with."""
    for path, report in reports:
        if "|" in report.eval_sha256:
            raise UserError(f"{path} was merged (`bench --compare`) from reports of different "
                            "eval sets, or of sets not recorded (eval_sha256 "
                            f"{report.eval_sha256}); plan from reports of one eval set")
    ref_path, ref = reports[0]
    hashed = [(p, r) for p, r in reports if r.eval_sha256]
    for path, report in reports[1:]:
        both = bool(report.eval_sha256 and ref.eval_sha256)
        if not both and _legacy_key(report) != _legacy_key(ref):
            raise _mixed(path, report, ref_path, ref)
    for path, report in hashed[1:]:
        if (report.eval_sha256, report.n_samples, _ids(report)) != (
                hashed[0][1].eval_sha256, hashed[0][1].n_samples, _ids(hashed[0][1])):
            raise _mixed(path, report, *hashed[0])
    legacy = [str(p) for p, r in reports if not r.eval_sha256]
    if not legacy or (len(reports) == 1 and not ref.sources):
        return []
    warning = (f"{', '.join(legacy)} predate eval-set hashes, so only the data file name, "
               "sample count and question ids were compared, not the questions, answers and "
               "images; re-run `edgevlm bench` for them to have the eval set verified")
    log.warning(warning)
    return [warning]


def _legacy_key(report: BenchReport) -> tuple:
    return Path(report.data).name, report.n_samples, _ids(report)


def _mixed(path: Path, report: BenchReport, ref_path: Path, ref: BenchReport) -> UserError:
    return UserError(f"{path} was measured on another eval set ({_describe(report)}) than "
                     f"{ref_path} ({_describe(ref)}); plan from reports of one eval set, or "
                     "bench every candidate on the same --data and --limit")


def _describe(report: BenchReport) -> str:
    sha = f", sha256 {report.eval_sha256[:12]}" if report.eval_sha256 else ", no hash"
    return f"{Path(report.data).name or '?'}, {report.n_samples} samples{sha}"


def pareto(points: list[Candidate]) -> list[Candidate]:
    """The points no other point dominates (at least as accurate, fast and small, and better
    in one), most accurate first."""
    def memory(c: Candidate) -> float:
        return c.memory_mb if c.memory_mb is not None else float("inf")

    def dominates(a: Candidate, b: Candidate) -> bool:
        no_worse = (a.accuracy >= b.accuracy and a.ttft_ms <= b.ttft_ms
                    and memory(a) <= memory(b))
        better = a.accuracy > b.accuracy or a.ttft_ms < b.ttft_ms or memory(a) < memory(b)
        return no_worse and better

    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda c: (-c.accuracy, c.ttft_ms))


def plan(paths: list[str | Path], max_ttft_ms: float | None = None,
         max_memory_mb: float | None = None) -> Plan:
    """The most accurate measured point within the budget; see the module docstring."""
    for flag, value in (("--max-ttft-ms", max_ttft_ms), ("--max-memory-mb", max_memory_mb)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value} must be a positive number")
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} {value} must be a finite number; leave it out for no "
                            "limit")
    points, warnings = _candidates(paths)
    inside = [c for c in points if c.over(max_ttft_ms, max_memory_mb) == 0]
    budget = {"max_ttft_ms": max_ttft_ms, "max_memory_mb": max_memory_mb}
    if not inside:
        closest = sorted(points, key=lambda c: c.over(max_ttft_ms, max_memory_mb))[:3]
        shown = "; ".join(f"{c.name} ({c.ttft_ms:.3g} ms, {c.memory_mb or 0:.0f} MB, "
                          f"{100 * c.over(max_ttft_ms, max_memory_mb):.0f}% over)"
                          for c in closest)
        raise UserError(f"no measured point meets the budget ({_budget_text(budget)}); the "
                        f"closest: {shown}. Raise the budget, or bench smaller exports "
                        "(fewer bits or visual tokens)")
    chosen = sorted(inside, key=lambda c: (-c.accuracy, c.ttft_ms, c.disk_mb))[0]
    return Plan(budget, points, pareto(points), chosen, tuple(warnings))


def _budget_text(budget: dict) -> str:
    parts = [f"TTFT <= {budget['max_ttft_ms']:g} ms" if budget["max_ttft_ms"] else "",
             f"memory <= {budget['max_memory_mb']:g} MB" if budget["max_memory_mb"] else ""]
    return ", ".join(p for p in parts if p) or "no limit"


def write(result: Plan, out_dir: str | Path, note: str = "") -> list[Path]:
    """plan.json and, when matplotlib is installed, plan.png (accuracy against TTFT, the front
    joined, the chosen point marked, the budget drawn; `note`, a caveat such as the demo's
    smoke test, as its title)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "plan.json"]
    written[0].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([c.ttft_ms for c in result.candidates],
               [100 * c.accuracy for c in result.candidates], c="0.6", label="measured")
    front = sorted(result.front, key=lambda c: c.ttft_ms)
    ax.plot([c.ttft_ms for c in front], [100 * c.accuracy for c in front], "o-",
            label="Pareto front")
    ax.scatter([result.chosen.ttft_ms], [100 * result.chosen.accuracy], s=160,
               facecolors="none", edgecolors="r", label=f"chosen: {result.chosen.name}")
    if result.budget["max_ttft_ms"]:
        ax.axvline(result.budget["max_ttft_ms"], color="r", linestyle="--", label="TTFT budget")
    ax.set_xlabel("time to first token with image (ms, median)")
    ax.set_ylabel("accuracy (%)")
    if note:
        ax.set_title(note, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plan.png", dpi=120)
    plt.close(fig)
    written.append(out / "plan.png")
    return written
