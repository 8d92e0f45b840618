"""An eval set is identified by a hash of its questions, answers and image bytes, recorded in
bench.json, and `plan` refuses reports of two sets (issue 33: the same questions with blank
images, same file name, count and ids, used to pass). Reports from before the hash are compared
as before, with a warning that is also listed in plan.json."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from PIL import Image

from edgevlm.bench.harness import BenchConfig, bench, eval_set_sha256
from edgevlm.bench.plan import plan
from edgevlm.bench.report import load_report, merge, to_json, to_markdown
from edgevlm.data.samples import load_samples
from edgevlm.errors import UserError
from tests.bench.conftest import FAST


def _copy_set(shapes_dir, dest, change_rows=None, blank_images=False):
    """A copy of the shapes eval set under the same file name, changed as asked."""
    dest.mkdir()
    rows = json.loads((shapes_dir / "eval.json").read_text())[:FAST["limit"]]
    for row in rows:
        image = dest / row["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        if blank_images:
            Image.new("RGB", Image.open(shapes_dir / row["image"]).size, "white").save(image)
        else:
            shutil.copy(shapes_dir / row["image"], image)
    if change_rows:
        change_rows(rows)
    (dest / "eval.json").write_text(json.dumps(rows))
    return dest / "eval.json"


def test_the_hash_covers_questions_answers_and_image_bytes(shapes_dir, tmp_path):
    samples = load_samples(shapes_dir / "eval.json")[:4]
    h = eval_set_sha256(samples)
    assert len(h) == 64 and h == eval_set_sha256(list(reversed(samples)))  # order: a label

    def answer(rows):
        rows[0]["conversations"][-1]["value"] += " indeed"

    def renamed(rows):
        rows[0]["id"] = "another-id"

    same = eval_set_sha256(load_samples(_copy_set(shapes_dir, tmp_path / "same"))[:2])
    assert same == eval_set_sha256(samples[:2])
    assert eval_set_sha256(load_samples(_copy_set(shapes_dir, tmp_path / "id", renamed))) == same
    for name, kwargs in (("answer", {"change_rows": answer}), ("blank", {"blank_images": True})):
        changed = load_samples(_copy_set(shapes_dir, tmp_path / name, **kwargs))
        assert eval_set_sha256(changed) != same, name


def test_the_report_records_the_hash(bench_json, shapes_dir):
    report = load_report(bench_json)
    samples = load_samples(shapes_dir / "eval.json")[:FAST["limit"]]
    assert report.eval_sha256 == eval_set_sha256(samples)
    assert json.loads(bench_json.read_text())["eval_sha256"] == report.eval_sha256
    assert report.eval_sha256 in to_markdown(report)


def test_the_same_questions_with_blank_images_are_refused(bench_json, export_dir, shapes_dir,
                                                          tmp_path):
    """The finding: file name, count and ids agree, the images do not."""
    blank = _copy_set(shapes_dir, tmp_path / "blank", blank_images=True)
    report = bench([export_dir], blank, BenchConfig(**FAST))
    (tmp_path / "blank.json").write_text(to_json(report))
    first = load_report(bench_json)
    assert (report.n_samples, {p["id"] for p in report.targets[0].predictions}) == (
        first.n_samples, {p["id"] for p in first.targets[0].predictions})
    with pytest.raises(UserError, match="was measured on another eval set") as e:
        plan([bench_json, tmp_path / "blank.json"])
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    # ... and the same set under another file name is one set.
    same = _copy_set(shapes_dir, tmp_path / "same")
    same.rename(same.with_name("renamed.json"))
    (tmp_path / "same.json").write_text(to_json(bench([export_dir], same.with_name(
        "renamed.json"), BenchConfig(**FAST))))
    assert not plan([bench_json, tmp_path / "same.json"]).warnings


def _without_hash(bench_json, path, **changes):
    d = json.loads(bench_json.read_text())
    del d["eval_sha256"]
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


def test_old_reports_are_compared_as_before_with_a_warning(bench_json, tmp_path, caplog):
    old = _without_hash(bench_json, tmp_path / "old.json")
    assert load_report(old).eval_sha256 == ""
    assert not plan([old]).warnings  # one report: nothing to compare
    with caplog.at_level(logging.WARNING, logger="edgevlm.bench.plan"):
        result = plan([bench_json, old])
    assert len(result.warnings) == 1 and "old.json predate eval-set hashes" in caplog.text
    assert "re-run `edgevlm bench`" in result.warnings[0]
    assert result.to_dict()["warnings"] == list(result.warnings)
    other = _without_hash(bench_json, tmp_path / "other.json", data="runs/other/test.json")
    with pytest.raises(UserError, match="was measured on another eval set"):
        plan([bench_json, other])  # what the old reports carry still has to agree


def test_a_merged_report_of_two_sets_is_refused(bench_json, tmp_path):
    a = load_report(bench_json)
    b = load_report(_without_hash(bench_json, tmp_path / "old.json"))
    (tmp_path / "one.json").write_text(to_json(merge([a, a], ["x", "y"])))
    assert plan([tmp_path / "one.json"]).chosen.name == a.targets[0].name
    (tmp_path / "mixed.json").write_text(to_json(merge([a, b], ["x", "y"])))
    with pytest.raises(UserError, match="merged .* from reports of different eval sets"):
        plan([tmp_path / "mixed.json"])
