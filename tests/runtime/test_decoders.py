"""The decoder back-ends are chosen once, when a VLM opens: the generation code in
runtime/model.py asks its Decoder and never which kind of decoder graph or profile it runs
(the back-ends themselves are exercised in test_builder_runtime.py and test_profiles.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import edgevlm.runtime.model as model

KINDS = {"traced", "builder", "mobile", "default", "gpu"}  # and as contract's enum members
MEMBERS = {"TRACED", "BUILDER", "MOBILE", "DEFAULT", "GPU"}


def test_the_generation_code_has_no_branch_on_decoder_kind_or_profile():
    """Only `VLM.load` reads the kind and profile: to check each graph's IO by the contract."""
    tree = ast.parse(Path(model.__file__).read_text())
    code = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name != "load"]
    assert {"__init__", "_prepare", "_steps", "_decode"} <= {f.name for f in code}
    nodes = [n for f in code for n in ast.walk(f)]
    bad = [f"model.py:{n.lineno} reads .{n.attr}" for n in nodes
           if isinstance(n, ast.Attribute) and n.attr in {"profile", "decoder", *MEMBERS}]
    bad += [f"model.py:{n.lineno} names {n.value!r}" for n in nodes
            if isinstance(n, ast.Constant) and n.value in KINDS]
    assert not bad, bad


def test_every_backend_has_the_whole_interface():
    from edgevlm.runtime import decoders

    wanted = {name for name, v in vars(decoders.Decoder).items()
              if callable(v) and not name.startswith("_")}
    assert wanted == {"embed", "new_cache", "decode", "limit_reason"}
    for backend in (decoders.TracedDecoder, decoders.BuilderDecoder, decoders.StaticDecoder):
        assert wanted <= set(vars(backend)), backend.__name__
