"""The command to run after each `edgevlm` command, with the paths that command just wrote.

Each stage's summary ends with these lines ("next: edgevlm export runs/student-w4 ..."), so the
pipeline of the README can be walked from the terminal alone. Folders the next command would
create are named after the input (MODEL-w4, MODEL-onnx); what only the user knows stays a
placeholder in capitals (DATA.json, IMG). Pure functions of paths: the CLI prints them
(edgevlm.cli.common.show_next), tests call them directly.
"""

from __future__ import annotations

import shlex
from pathlib import Path


def _q(value) -> str:
    """A path or text as one shell word (quoted only where the shell needs it)."""
    return shlex.quote(str(value))


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _data_file(near: Path | None, name: str, placeholder: str) -> str:
    """`name` (eval.json, train.json) beside a data file when `edgevlm data shapes` left one
    there, else the placeholder."""
    if near is not None and (Path(near).parent / name).is_file():
        return _q(Path(near).parent / name)
    return placeholder


def _trained(model: Path) -> Path:
    """Where `train` puts a model made by `init`: runs/teacher0 -> runs/teacher (the README's
    naming), anything else -> MODEL-trained."""
    stem = model.name.rstrip("0")
    if model.name.endswith("0") and stem:
        return model.with_name(stem)
    return _beside(model, "-trained")


def after_shapes(out: Path) -> list[str]:
    train, pretrain = _q(out / "train.json"), _q(out / "pretrain.json")
    model0 = out.parent / "teacher0"
    return [f"edgevlm init {_q(model0)} --preset tiny-teacher --tokenizer-data {train} "
            f"--tokenizer-data {pretrain}",
            f"edgevlm train {_q(model0)} {train} {pretrain} --out {_q(out.parent / 'teacher')} "
            "--train-vision"]


def after_init(out: Path, tokenizer_data: list[Path] | None) -> list[str]:
    data = " ".join(_q(p) for p in tokenizer_data) if tokenizer_data else "DATA.json"
    return [f"edgevlm train {_q(out)} {data} --out {_q(_trained(out))}"]


def after_train(out: Path, data: list[Path]) -> list[str]:
    evals = _data_file(data[0] if data else None, "eval.json", "EVAL.json")
    return [f"edgevlm eval {_q(out)} {evals}"]


def after_quantize(out: Path, bits: int, group_size: int, calib: Path | None) -> list[str]:
    """Export carries 4-bit grouped and 8-bit per-channel checkpoints as they are (export/
    source.py); others are evaluated in torch, as export would refuse them."""
    if (bits, group_size > 0) in ((4, True), (8, False)):
        return [f"edgevlm export {_q(out)} --out {_q(_beside(out, '-onnx'))} "
                f"--precision int{bits}"]
    return [f"edgevlm eval {_q(out)} {_data_file(calib, 'eval.json', 'EVAL.json')}"]


def after_export(out: Path) -> list[str]:
    return [f"edgevlm run {_q(out)} --image IMG --prompt {_q('What is in the image?')}",
            f"edgevlm bench {_q(out)} --data EVAL.json --report {_q(_beside(out, '-bench'))}"]


def after_distill(out: Path, final: Path, data: Path | None) -> list[str]:
    calib = _q(data) if data is not None else "CALIB.json"
    return [f"edgevlm quantize {_q(final)} --out {_q(_beside(out, '-w4'))} --calib {calib}",
            f"edgevlm export {_q(final)} --out {_q(_beside(out, '-onnx'))} --precision int4"]


def after_bench(report: Path | None) -> list[str]:
    if report is None:
        return []
    return [f"edgevlm plan --reports {_q(report / 'bench.json')} --max-ttft-ms MS"]


def after_demo(export: Path, image: Path, question: str) -> list[str]:
    return [f"edgevlm run {_q(export)} --image {_q(image)} --prompt {_q(question)}"]
