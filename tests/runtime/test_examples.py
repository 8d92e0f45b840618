"""examples/embed_runtime.py runs on a device install: torch blocked, answers equal VLM's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed_runtime.py"

# Runs the example in a fresh interpreter where importing torch/transformers fails.
RUNNER = r"""
import importlib.abc, runpy, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "accelerate"):
            raise ImportError(f"{name} is blocked: the example must run without torch")
        return None

sys.meta_path.insert(0, Block())
example = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(example, run_name="__main__")
"""

QUESTIONS = ["What color is the circle?", "How many shapes are there?"]


def _run(args, stdin=None):
    return subprocess.run([sys.executable, "-c", RUNNER, str(EXAMPLE), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_embed_runtime_answers_as_vlm_does(export_dir, eval_samples, vlm, tmp_path):
    image = str(eval_samples[0].image)
    out = tmp_path / "answers.json"
    args = [str(export_dir), image, "--max-new-tokens", "6", "--json", str(out)]
    proc = _run(args + [x for q in QUESTIONS for x in ("--question", q)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())["answers"]
    want = [vlm.generate(image, q, max_new_tokens=6).text for q in QUESTIONS]
    assert [a["answer"] for a in got] == want
    assert all(a["n_new_tokens"] >= 1 for a in got)
    for q, a in zip(QUESTIONS, want):  # streamed to the terminal as it was decoded
        assert f"Q: {q}\nA: " in proc.stdout and a in proc.stdout


def test_embed_runtime_reads_questions_from_stdin(export_dir, eval_samples, vlm, tmp_path):
    image = str(eval_samples[1].image)
    out = tmp_path / "answers.json"
    proc = _run([str(export_dir), image, "--max-new-tokens", "4", "--json", str(out)],
                stdin="\n".join(QUESTIONS) + "\n\nignored after the empty line\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())["answers"]
    assert [a["question"] for a in got] == QUESTIONS
    assert [a["answer"] for a in got] == [vlm.generate(image, q, max_new_tokens=4).text
                                          for q in QUESTIONS]
