"""--layer-bits strings (issue 33): `v_proj=8,v_proj=3` was stored at 8, reported as 3, left a
dead 3-bit group in the config and then a misleading export refusal; a Unicode digit ('²') was
a traceback. Every string is now a config or one line, never an exception of another kind."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevlm.cli.quant import parse_layer_bits
from edgevlm.errors import UserError
from edgevlm.quant import QuantConfig


def config(text: str) -> QuantConfig:
    return QuantConfig(method="rtn", layer_bits=parse_layer_bits(text))


@pytest.mark.parametrize(("text", "message"), [
    ("v_proj=8,v_proj=3", "v_proj is given twice; give each layer once"),
    ("v_proj=8,self_attn.v_proj=3", "v_proj and self_attn.v_proj can name the same Linear"),
    ("v_proj=²", "'v_proj=²' is not NAME=BITS"),
    ("v_proj=٨", "'v_proj=٨' is not NAME=BITS"),
    ("v_proj=" + "9" * 5000, "is not NAME=BITS"),
    ("prój=8", "'prój' is not a module name"),
    ("a..b=8", "'a..b' is not a module name"),
])
def test_bad_layer_bits_are_one_line(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config(text)


def test_distinct_layers_pass():
    cfg = config("v_proj=8,mlp.down_proj=6,k_proj=3")
    assert cfg.layer_bits == (("v_proj", 8), ("mlp.down_proj", 6), ("k_proj", 3))
    assert cfg.bits_for("model.layers.0.self_attn.v_proj") == 8
    assert cfg.bits_for("model.layers.0.mlp.down_proj") == 6


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("v_proj.k=,0123456789²٨ -é"), max_size=40))
def test_any_layer_bits_string_is_a_config_or_one_line(text):
    try:
        cfg = config(text)
    except UserError as e:
        assert "\n" not in str(e)
        return
    names = [n for n, _ in cfg.layer_bits]
    assert len(set(names)) == len(names)  # stored and reported bits cannot disagree
    assert all(2 <= b <= 8 for _, b in cfg.layer_bits)
