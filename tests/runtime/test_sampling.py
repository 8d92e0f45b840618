"""Token choice and stop strings, tested directly on numbers."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime.sampling import GenerationConfig, StopFilter, pick_token


def _counts(logits, n=4000, **kw):
    cfg, rng = GenerationConfig(temperature=1.0, **kw), np.random.default_rng(0)
    picks = [pick_token(np.asarray(logits, dtype=np.float32), cfg, rng) for _ in range(n)]
    return np.bincount(picks, minlength=len(logits)) / n


def test_greedy_takes_the_first_maximum():
    assert pick_token(np.array([0.0, 3.0, 3.0, 1.0]), GenerationConfig(), None) == 1


def test_filters():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert np.allclose(_counts(logits), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top_k = _counts(logits, top_k=2)
    assert top_k[2:].sum() == 0 and np.allclose(top_k[:2], [0.625, 0.375], atol=0.03)
    top_p = _counts(logits, top_p=0.7)  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert top_p[2:].sum() == 0 and top_p[1] > 0.3
    assert _counts(logits, top_p=0.4)[0] == 1.0  # the most likely token always stays


def test_config_errors_name_the_field():
    for kw, field in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1},
                      "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
                      ({"stop": ("",)}, "stop")):
        with pytest.raises(UserError, match=field):
            GenerationConfig(**kw)


def test_stop_filter_holds_back_partial_matches():
    f = StopFilter(("END", "\n\n"))
    out = [f.feed(p) for p in ("The ans", "wer E", "N", "D and more")]
    assert "".join(out) == "The answer " and f.hit
    assert out[1] == "wer " and out[2] == ""  # "E", "EN" were held back
    g = StopFilter(("END",))
    assert g.feed("an E") == "an " and g.feed("nd") == "End" and g.flush() == ""
    assert not g.hit
    h = StopFilter(("xyz",))
    assert h.feed("ab x") == "ab " and h.flush() == "x"
