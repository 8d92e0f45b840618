"""The one harness every benchmark script runs on (docs/benchmarks.md).

Run a script from the repository root as a module: `python -m benchmarks.<stage>.<name> ...`.

- Record.start(module): what a run was: its command line with every path under the repository
  written relative to the repository root, the git commit, the machine (CPU, cores, memory:
  edgevlm.bench.report.machine_info) and when it started. write() puts it into every result.
- run_step(cmd): one command (an `edgevlm ...` CLI call, a helper process) as a subprocess,
  timed, with its peak resident memory read from the kernel; skipped when its output exists.
  timed(fn): the same for a step run in this process.
- write(path, data, markdown, record): PATH.json (the record's keys first) and PATH.md (the
  markdown and a line naming the run), each written whole or not at all.
- parser(__doc__, out=..., quick=..., ...): a script's argparse parser with the options every
  script spells the same way (--out, --work, --quick, --jobs, --seeds, --threads).
- The ablation skeleton (distill/kd_ablation, distill/mod_ablation, quant/ablation): run_grid
  runs (row, seed) jobs on fresh spawned processes with one torch thread each and keeps a failed
  job's error beside the others' results; stats gives mean, sample standard deviation, min and
  max over seeds; quick_teacher makes the small data set and briefly trained teacher a --quick
  run needs, so it needs no inputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# -- the record of a run ----------------------------------------------------------------------

def relative(token: str) -> str:
    """A command-line token with a path under the repository written relative to its root
    (`/home/me/edgevlm/runs/teacher` -> `runs/teacher`); `NAME=PATH` and `--opt=PATH` likewise.
    Other tokens, and paths outside the repository (a /tmp work folder), stay as given."""
    token = str(token)
    head, eq, tail = token.partition("=")
    if eq and head and tail:
        return f"{head}={relative(tail)}"
    if not token or token.startswith("-"):
        return token
    path = Path(token).expanduser()
    if not path.is_absolute():
        if Path.cwd().resolve() == ROOT or not path.exists():
            return token  # relative to the root already, or not a path
        path = Path.cwd() / path
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        if candidate.is_relative_to(ROOT):
            return candidate.relative_to(ROOT).as_posix() or "."
    return token


def show(cmd: Sequence[Any]) -> str:
    """A subprocess's command as a shell line: paths relative, this Python as `python`, a
    program of this environment (its `edgevlm`) by its name."""
    words = [str(c) for c in cmd]
    if words:
        exe = Path(words[0])
        if words[0] == sys.executable:
            words[0] = "python"
        elif exe.is_absolute() and exe.parent == Path(sys.executable).parent:
            words[0] = exe.name
    return shlex.join([words[0], *map(relative, words[1:])] if words else [])


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How this run was started: `python -m MODULE ARGS` (`nice ` first when it ran niced)."""
    args = sys.argv[1:] if argv is None else list(argv)
    nice = "nice " if hasattr(os, "nice") and os.nice(0) > 0 else ""
    module = module.removesuffix(".__main__")
    return nice + shlex.join(["python", "-m", module, *map(relative, map(str, args))])


def _git(where: Path, *args: str) -> subprocess.CompletedProcess:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh (write) the index of a checkout in use
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})


def git_commit(where: Path = ROOT) -> tuple[str | None, bool]:
    """The commit of the checkout holding WHERE (`git rev-parse --short HEAD`) and whether
    tracked files differ from it; (None, False) outside a git checkout. Reads only."""
    try:
        head = _git(where, "rev-parse", "--short", "HEAD")
    except OSError:  # no git
        return None, False
    if head.returncode:
        return None, False
    changed = _git(where, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip(), bool(changed)


def machine() -> dict:
    """The machine, as `edgevlm bench` reports it: CPU model, cores, memory, OS, versions."""
    from edgevlm.bench.report import machine_info

    m = machine_info()
    return {"cpu": m.cpu, "logical_cores": m.logical_cores, "physical_cores": m.physical_cores,
            "memory_gb": round(m.ram_bytes / 1e9, 1) if m.ram_bytes else None, "os": m.os,
            "python": m.python, "versions": m.versions}


@dataclass(frozen=True)
class Record:
    """What a run was: command (paths relative to the repository), commit, machine, start."""

    command: str
    commit: str | None
    uncommitted_changes: bool
    machine: dict
    started: str

    @classmethod
    def start(cls, module: str, argv: Sequence[str] | None = None) -> Record:
        """MODULE: the script's `__spec__.name` (`benchmarks.quant.ablation`, also under -m)."""
        commit, changed = git_commit()
        return cls(command=command_line(module, argv), commit=commit,
                   uncommitted_changes=changed, machine=machine(),
                   started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)

    def footer(self) -> str:
        """One markdown line naming the run."""
        m = self.machine
        commit = (self.commit or "no git") + (" with uncommitted changes"
                                             if self.uncommitted_changes else "")
        return (f"Run: `{self.command}` at commit {commit}, {self.started}; {m['cpu']}, "
                f"{m['logical_cores']} logical cores, {m['memory_gb']} GB.")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def json_path(path: Path) -> Path:
    """PATH.json for a results stem or a .json path (a stem may hold dots: `..._0.0005`)."""
    path = Path(path)
    return path if path.suffix == ".json" else path.with_name(path.name + ".json")


def write(path: Path, data: dict, markdown: str | None = None,
          record: Record | None = None) -> Path:
    """PATH.json (the record's keys first, then `data`) and, given `markdown`, PATH.md beside it
    ending in the record's line; each file is replaced whole. The record replaces the keys of
    the same names in `data` (an earlier run's, loaded to be resumed). Returns the json path."""
    target = json_path(path)
    head = record.to_dict() if record else {}
    body = {**head, **{k: v for k, v in data.items() if k not in head}}
    _atomic_write(target, json.dumps(body, indent=1, default=str) + "\n")
    if markdown is not None:
        text = markdown.rstrip("\n") + "\n"
        if record is not None:
            text += "\n" + record.footer() + "\n"
        _atomic_write(target.with_suffix(".md"), text)
    return target


def load(path: Path, default: dict | None = None) -> dict:
    """A results file written before (a rerun keeps its rows), or `default`."""
    target = json_path(path)
    if target.is_file():
        return json.loads(target.read_text())
    return {} if default is None else default


# -- steps ------------------------------------------------------------------------------------

@dataclass
class Step:
    """One step's outcome. seconds is None when it was skipped (its output existed)."""

    command: str
    seconds: float | None = None
    returncode: int = 0
    peak_rss_bytes: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def skipped(self) -> bool:
        return self.seconds is None

    def to_dict(self) -> dict:
        """The step as a results entry (no captured output)."""
        return {"command": self.command, "seconds": self.seconds, "returncode": self.returncode,
                "peak_rss_bytes": self.peak_rss_bytes}


def run_step(cmd: Sequence[Any], *, skip_if: Path | None = None, capture: bool = False,
             check: bool = True, env: dict | None = None, cwd: Path | None = None,
             echo: bool = True) -> Step:
    """Run CMD as a subprocess and time it; skip it when `skip_if` exists.

    The child's peak resident memory is its own (wait4's ru_maxrss), not this process's. With
    `capture` its stdout and stderr are kept on the Step instead of shown. `check`: raise
    subprocess.CalledProcessError on a non-zero exit. `echo`: print the command first."""
    words = [str(c) for c in cmd]
    shown = show(words)
    if skip_if is not None and Path(skip_if).exists():
        if echo:
            print(f"skip (exists): {shown}", flush=True)
        return Step(shown)
    if echo:
        print(f"+ {shown}", flush=True)
    pipe = subprocess.PIPE if capture else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(words, stdout=pipe, stderr=pipe, text=True, cwd=cwd,
                            env=None if env is None else {**os.environ, **env})
    out: dict[str, str] = {"stdout": "", "stderr": ""}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()))
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr)) if s is not None]
    for r in readers:
        r.start()
    rss = None
    try:
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
        else:
            proc.wait()
    except BaseException:
        proc.kill()
        raise
    finally:
        for r in readers:
            r.join()
    step = Step(shown, time.perf_counter() - t0, proc.returncode, rss, out["stdout"],
                out["stderr"])
    if check and step.returncode:
        raise subprocess.CalledProcessError(step.returncode, words, step.stdout, step.stderr)
    return step


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """A step run in this process: fn's result and the seconds it took."""
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t0


# -- options ----------------------------------------------------------------------------------

_UNSET = object()


def parser(doc: str | None, *, out: Any = _UNSET, out_help: str = "", work: Any = _UNSET,
           quick: str | None = None, jobs: int | None = None, seeds: str | None = None,
           threads: int | None = None) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the help text and, for each keyword given, the
    option every script spells the same way (the value is its default)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # set under `python -m`
    prog = (f"python -m {spec.name.removesuffix('.__main__')}"
            if spec is not None and spec.name.startswith("benchmarks.") else None)
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is not _UNSET:
        p.add_argument("--out", type=Path, default=out,
                       help=out_help or "where the results go (default: %(default)s)")
    if work is not _UNSET:
        p.add_argument("--work", type=Path, default=work,
                       help="scratch folder for models, exports and evals (default: "
                            "%(default)s; a rerun reuses what is there)")
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    if jobs is not None:
        p.add_argument("--jobs", type=int, default=jobs,
                       help="runs side by side, one torch thread each (default: %(default)s)")
    if seeds is not None:
        p.add_argument("--seeds", default=seeds, help="comma-separated seeds (default: "
                                                      "%(default)s)")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads,
                       help="intra-op threads (default: %(default)s)")
    return p


def out_dir(args: argparse.Namespace, work: Path) -> Path:
    """Where an ablation writes: --out, else (--quick) its work folder, else the committed
    benchmarks/results. A --quick run never replaces a committed table."""
    if args.out is not None:
        return args.out
    return work if args.quick else RESULTS


# -- the ablation skeleton --------------------------------------------------------------------

def stats(values: Iterable[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count over seeds."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def pool(workers: int) -> ProcessPoolExecutor:
    """`workers` fresh spawned processes, each with a torch of its own on one thread."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)


def run_grid(fn: Callable[..., dict], jobs: Sequence[tuple], workers: int | ProcessPoolExecutor,
             describe: Callable[[tuple, dict], str] = lambda job, r: "done",
             name: Callable[[tuple], str] = lambda job: " ".join(map(str, job[:2]))
             ) -> tuple[list[tuple[tuple, dict]], list[dict]]:
    """fn(*job) for every job on `workers` processes (a number: a new pool(); or a pool to
    reuse across phases), submitted in the order given (longest first packs the workers).
    Returns ([(job, result)] in finishing order, [{"job": name(job), "error"}]): a job that
    raises is reported and kept as an error, so one failure does not lose the other rows."""
    if isinstance(workers, int):
        with pool(workers) as executor:
            return run_grid(fn, jobs, executor, describe, name)
    done, errors, t0 = [], [], time.time()
    futures = {workers.submit(fn, *job): job for job in jobs}
    for fut in as_completed(futures):
        job = futures[fut]
        try:
            result = fut.result()
        except Exception as e:
            print(f"[{time.time() - t0:6.0f}s] FAILED {name(job)}: {e!r}", flush=True)
            errors.append({"job": name(job), "error": repr(e)})
            continue
        done.append((job, result))
        print(f"[{time.time() - t0:6.0f}s] {describe(job, result)}", flush=True)
    return done, errors


def distill_work(args, name: str) -> Path:
    """The work folder of a distillation ablation (args.work, else a new temp folder), with the
    quiet libraries every ablation wants; a --quick run without --teacher/--data gets its own
    quick_teacher there (args.data and args.teacher are set)."""
    from edgevlm.cli.common import quiet_libraries

    quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix=f"{name}_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick and (args.teacher is None or args.data is None):
        args.data, args.teacher = quick_teacher(work)
    return work


def quick_teacher(root: Path) -> tuple[Path, Path]:
    """(shapes folder, teacher folder) in ROOT, made if missing: 64 training and 24 eval
    samples and a tiny-teacher trained 20 steps on them. About 10 s on 2 cores; what a --quick
    run measures, to prove the script runs (its numbers mean nothing)."""
    from edgevlm import train
    from edgevlm.data import load_samples, shapes
    from edgevlm.models import create, load_model

    data, teacher = root / "shapes", root / "teacher"
    if not (data / "eval.json").exists():
        shapes.generate(data, n_train=64, n_eval=24, seed=1)
    if not (teacher / "config.json").exists():
        create(root / "teacher_init", preset="tiny-teacher",
               tokenizer_data=[data / "train.json", data / "pretrain.json"], vocab_size=400,
               overwrite=True)
        cfg = train.TrainConfig(stage="sft", steps=20, batch_size=8, lr=3e-3, warmup=2,
                                save_every=10**9)
        train.run(load_model(root / "teacher_init"), load_samples(data / "train.json"),
                  teacher, cfg, overwrite=True, quiet=True)
    return data, teacher
