"""bench.json is checked field by field before `plan` or `bench --compare` reads a number
(issue 33): each way a report used to end in a traceback (13 of them), a NaN time to first token
that sat inside every budget and an accuracy of 700% that won the plan, now end in one line that
names the file, the field and the fix."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
from typer.testing import CliRunner

from edgevlm.bench.plan import plan
from edgevlm.bench.report import load_report
from edgevlm.cli import app
from edgevlm.errors import UserError


def _set(*path, value):
    """A change to bench.json: the value at `path` (keys and list indices) set to `value`."""
    def change(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return change


def _drop(*path):
    def change(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return change


T = ("targets", 0)
# (what is wrong, the change, the field the message names): the 13 tracebacks of issue 33
# first, then what was silently taken.
BROKEN = [
    ("machines a list", _set("machines", value=[]), "machines is []"),
    ("a machine a string", _set("machines", "m", value="cpu"), "machines['m'] is 'cpu'"),
    ("targets an object", _set("targets", value={"a": 1}), "targets is {'a': 1}"),
    ("a target a string", _set("targets", 0, value="fp32"), "targets[0] is 'fp32'"),
    ("a spread a number", _set(*T, "ttft_s", value=3), "targets[0].ttft_s is 3"),
    ("a spread's n a string", _set(*T, "ttft_s", "n", value="4"), "targets[0].ttft_s.n"),
    ("peak memory a string", _set(*T, "peak_rss_bytes", value="9"), "peak_rss_bytes"),
    ("disk size null", _set(*T, "disk_bytes", value=None), "targets[0].disk_bytes"),
    ("predictions an object", _set(*T, "predictions", value={"a": 1}), "predictions is"),
    ("a prediction a string", _set(*T, "predictions", 0, value="x"), "predictions[0] is"),
    ("an id a list", _set(*T, "predictions", 0, "id", value=[1]), "predictions[0].id is [1]"),
    ("per_type a list", _set(*T, "per_type", value=[0.5]), "targets[0].per_type"),
    ("a name a number", _set(*T, "name", value=5), "targets[0].name is 5"),
    ("accuracy a string", _set(*T, "accuracy", value="0.5"), "accuracy is '0.5'"),
    ("a field missing", _drop(*T, "ttft_s"), "targets[0] lacks ttft_s"),
    ("a huge integer", _set(*T, "disk_bytes", value=10**30), "disk_bytes is"),
    ("versions of numbers", _set(*T, "versions", value={"onnxruntime": 1}), "versions['onnx"),
]
OUT_OF_RANGE = [
    ("NaN TTFT", _set(*T, "ttft_s", "median", value=math.nan), "ttft_s.median is nan"),
    ("infinite TTFT", _set(*T, "ttft_s", "median", value=math.inf), "ttft_s.median is inf"),
    ("TTFT not measured", _set(*T, "ttft_s", value={"median": None, "p10": None, "p90": None,
                                                    "n": 0}), "ttft_s.n is 0"),
    ("negative TTFT", _set(*T, "ttft_s", "median", value=-0.01), "ttft_s.median is -0.01"),
    ("accuracy 700%", _set(*T, "accuracy", value=7.0), "accuracy is 7.0, not a finite number "
                                                        "from 0 to 1"),
    ("accuracy NaN", _set(*T, "accuracy", value=math.nan), "accuracy is nan"),
    ("a type's accuracy 150%", _set(*T, "per_type", value={"color": 1.5}), "per_type['color']"),
    ("more correct than asked", _set(*T, "correct", value=3), "correct is 3, not at most total"),
    ("negative memory", _set(*T, "peak_rss_bytes", value=-1), "peak_rss_bytes is -1"),
    ("an empty spread with a median", _set(*T, "decode_tokens_per_s", value={
        "median": 5.0, "p10": None, "p90": None, "n": 0}), "decode_tokens_per_s.median is 5.0"),
]


def _variant(bench_json, tmp_path, change) -> str:
    d = copy.deepcopy(json.loads(bench_json.read_text()))
    d["machines"] = {"m": next(iter(d["machines"].values()))}
    change(d)
    path = tmp_path / "bench.json"
    # json.dumps writes NaN and Infinity, as a hand-edited or foreign report may hold them
    path.write_text(json.dumps(d))
    return str(path)


def _one_line(error: UserError, path: str, field: str) -> None:
    text = str(error)
    assert "\n" not in text and text.startswith(path + ":"), text
    assert field in text and ("re-run" in text or "correct" in text), text


@pytest.mark.parametrize("what,change,field", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_malformed_report_is_one_line_naming_the_field(bench_json, tmp_path, what, change,
                                                         field):
    path = _variant(bench_json, tmp_path, change)
    with pytest.raises(UserError) as e:
        plan([path], max_ttft_ms=1e6)
    _one_line(e.value, path, field)


@pytest.mark.parametrize("what,change,field", OUT_OF_RANGE, ids=[b[0] for b in OUT_OF_RANGE])
def test_numbers_outside_their_meaning_are_refused(bench_json, tmp_path, what, change, field):
    """NaN TTFT used to sit inside every budget and an accuracy of 7 won every plan."""
    path = _variant(bench_json, tmp_path, change)
    with pytest.raises(UserError) as e:
        plan([path], max_ttft_ms=1e-6)  # no real point meets this budget
    _one_line(e.value, path, field)


def test_the_cli_readers_refuse_them_in_one_line(bench_json, tmp_path):
    path = _variant(bench_json, tmp_path, _set(*T, "accuracy", value=7.0))
    for args in (["plan", "--reports", path], ["bench", "--compare", path]):
        run = CliRunner().invoke(app, args)
        assert isinstance(run.exception, UserError), (args, run.output)
        _one_line(run.exception, path, "targets[0].accuracy is 7.0")


@pytest.mark.parametrize("flag,value,match", [
    ("max_ttft_ms", math.inf, "--max-ttft-ms inf must be a finite number"),
    ("max_memory_mb", math.nan, "--max-memory-mb nan must be a positive number"),
])
def test_a_budget_that_is_not_a_number_is_refused(bench_json, flag, value, match):
    with pytest.raises(UserError, match=match):
        plan([bench_json], **{flag: value})


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000, "not valid JSON (nested too deeply)"),
    ('{"machines": {}, "targets": [], "n_samples": ' + "9" * 5000 + "}", "not valid JSON"),
    (b"\xff\xfe{".decode("latin-1"), "not valid JSON"),
    ("[]", "is not a bench report"),
])
def test_files_that_are_no_json_report_are_one_line(tmp_path, text, match):
    path = tmp_path / "bench.json"
    path.write_text(text, encoding="latin-1")
    with pytest.raises(UserError, match=re.escape(match)) as e:
        load_report(path)
    assert "\n" not in str(e.value)


def test_fields_a_newer_version_adds_are_ignored(bench_json, tmp_path):
    path = _variant(bench_json, tmp_path, lambda d: (d.update(future=1),
                                                     d["targets"][0]["ttft_s"].update(p99=1.0)))
    original = load_report(bench_json)
    assert load_report(path).targets == original.targets


def test_a_report_with_no_targets_is_one_line(bench_json, tmp_path):
    path = _variant(bench_json, tmp_path, _set("targets", value=[]))
    with pytest.raises(UserError, match="holds no measured targets"):
        plan([path])
