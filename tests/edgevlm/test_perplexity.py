"""`edgevlm eval --text`: perplexity on real text equals a plain transformers loss loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.errors import UserError
from edgevlm.models import load_model
from edgevlm.perplexity import perplexity, pydoc_text, read_text


def plain_loop(model, ids, context):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - context + 1, context):
            w = torch.tensor([ids[i: i + context]])
            total += float(model(input_ids=w, labels=w).loss) * (context - 1)
            count += context - 1
    return math.exp(total / count), count


def test_perplexity_equals_the_plain_loss_loop(micro_model_dir):
    loaded = load_model(micro_model_dir)
    text = pydoc_text()[:6000]
    ids = loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"][:1000]
    ref, count = plain_loop(loaded.model, ids, 64)
    r = perplexity(loaded, text, context=64, max_tokens=1000, batch_size=3, quiet=True)
    assert r.tokens_scored == count == (1000 // 64) * 63 and r.windows == 1000 // 64
    assert r.perplexity == pytest.approx(ref, rel=1e-5)
    # a random model over a 400-token vocabulary is near uniform: a real check, not a tautology
    assert 100 < r.perplexity < 1000


def test_pydoc_text_is_real_english():
    text = pydoc_text()
    assert len(text) > 100_000 and text.count(" the ") > 1000


def test_bad_text_is_named(micro_model_dir, tmp_path):
    loaded = load_model(micro_model_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        read_text(empty)
    with pytest.raises(UserError, match="does not exist; `edgevlm data pydoc"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="shorter than one context of 128"):
        perplexity(loaded, "a short text", context=128, quiet=True)
    with pytest.raises(UserError, match="over the model's 256 positions"):
        perplexity(loaded, pydoc_text(), context=512, quiet=True)
    with pytest.raises(UserError, match="--max-tokens 100 is below --context 128"):
        perplexity(loaded, pydoc_text(), context=128, max_tokens=100, quiet=True)


def test_cli_eval_text_writes_json(micro_model_dir, tmp_path):
    runner = CliRunner()
    text = tmp_path / "pydoc.txt"
    r = runner.invoke(app, ["data", "pydoc", str(text)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "ppl.json"
    r = runner.invoke(app, ["eval", str(micro_model_dir), "--text", str(text), "--context", "64",
                            "--max-tokens", "256", "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    ppl = json.loads(out.read_text())["perplexity"]
    assert ppl["tokens_scored"] == 4 * 63 and 100 < ppl["perplexity"] < 1000
    r = runner.invoke(app, ["eval", str(micro_model_dir)])
    assert r.exit_code != 0 and "give an evaluation DATA.json, --text FILE" in str(r.exception)
