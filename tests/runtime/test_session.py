"""Execution providers by short name: auto, missing providers name their package, threads."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime import session


def test_every_choice_maps_to_an_ort_provider():
    known = set(ort.get_all_providers())
    assert set(session.PROVIDERS.values()) <= known
    assert set(session.PACKAGES) == set(session.PROVIDERS)


def test_auto_picks_an_available_provider():
    chosen = session.resolve("auto")
    assert chosen.ort_name in ort.get_available_providers()
    assert chosen.chosen in session.available()
    assert session.resolve("cpu").ort_name == "CPUExecutionProvider"


def test_unavailable_provider_names_its_package():
    missing = [p for p in session.PROVIDERS if p not in session.available()]
    if not missing:
        pytest.skip("every provider is installed here")
    for name in missing:
        with pytest.raises(UserError) as e:
            session.resolve(name)
        assert session.PACKAGES[name].split(" (")[0] in str(e.value)


def test_bad_names_and_threads():
    with pytest.raises(UserError, match="unknown"):
        session.resolve("tpu")
    with pytest.raises(UserError, match="threads"):
        session.SessionConfig("cpu", threads=0)
    assert session.options(3).intra_op_num_threads == 3


def test_corrupt_graph_is_a_user_error(tmp_path):
    bad = tmp_path / "decoder_model_merged.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf graph")
    with pytest.raises(UserError, match="decoder_model_merged.onnx"):
        session.open_session(bad, session.resolve("cpu"))
    with pytest.raises(UserError, match="missing"):
        session.open_session(tmp_path / "nope.onnx", session.resolve("cpu"))


def test_session_reports_the_provider_it_runs_on(export_dir):
    graph = export_dir / "onnx" / "embed_tokens.onnx"
    sess, used = session.open_session(graph, session.resolve("auto"), threads=1)
    assert used.ort_name == sess.get_providers()[0]


def test_sessions_that_run_between_decoder_runs_do_not_spin(export_dir):
    """The vision encoder and the embedding give the cores back when a run ends (their spinning
    threads slowed the decoder's prefill by a fifth on SmolLM2); the decoder keeps spinning."""
    from edgevlm.runtime import VLM

    def spinning(opts) -> str | None:
        try:
            return opts.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set: onnxruntime's default, which spins
            return None

    assert spinning(session.options(2, spin=False)) == "0"
    assert spinning(session.options(2)) is None
    vlm = VLM.load(export_dir, provider="cpu", threads=2)
    assert spinning(vlm._vision.get_session_options()) == "0"
    assert spinning(vlm._embed.get_session_options()) == "0"
    assert spinning(vlm._decoder.get_session_options()) is None
