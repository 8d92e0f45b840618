"""Continuous batching (edgevlm.runtime.batched, issue 36 item 3): each request's greedy tokens
under batched decode passes equal the same request's alone, while other rows prefill (in
chunks) and decode beside it at other lengths; a closed stream frees its row at once; the engine
batches a builder export with --parallel 2 or more unless told not to."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgevlm.errors import UserError
from tests.serve.conftest import image_of, png_url

QUESTIONS = ["What shape is it?", "Describe the picture in a few words, please.",
             "Is there a circle? Answer and then say why, at length, with detail."]


def _calls(n: int) -> list[tuple]:
    """(image or None, question, max_new_tokens): prompts and answers of different lengths."""
    return [(image_of(png_url(40 + i)) if i % 3 else None, QUESTIONS[i % 3], 4 + 5 * (i % 4))
            for i in range(n)]


def _tokens(vlm, calls, threads: int) -> list[tuple[int, ...]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda c: vlm.generate(c[0], c[1], max_new_tokens=c[2]).token_ids,
                             calls))


@pytest.fixture(scope="module")
def chunked_vlm(serve_export):
    """Prompts prefilled 5 tokens at a time: rows prefill between other rows' decode passes."""
    from edgevlm.runtime import VLM

    return VLM.load(serve_export, provider="cpu", threads=1, prefill_chunk=5)


@pytest.mark.parametrize("rows", [2, 4])
def test_batched_greedy_tokens_equal_alone(chunked_vlm, rows):
    from edgevlm.runtime.batched import BatchedVLM

    calls = _calls(12)
    alone = [chunked_vlm.generate(*c[:2], max_new_tokens=c[2]).token_ids for c in calls]
    batched = BatchedVLM.from_vlm(chunked_vlm, rows)
    try:
        got = _tokens(batched, calls, rows)
        passes, stepped = batched.stats()
    finally:
        batched.close()
    assert got == alone
    assert len(set(alone)) > 3  # the answers differ, so a mix-up of rows would show
    assert stepped > passes  # some passes carried more than one row
    assert sum(len(t) for t in alone) > stepped * 0.5  # the steps went through the batcher


def test_a_closed_stream_frees_its_row_at_once(served_vlm):
    from edgevlm.runtime.batched import BatchedVLM

    batched = BatchedVLM.from_vlm(served_vlm, 1)  # one row: the next call needs this one
    try:
        pieces = iter(batched.stream(None, "Describe it at length.", max_new_tokens=200,
                                     min_new_tokens=200))
        next(pieces)
        pieces.close()  # what the engine does when a client disconnects
        done = threading.Event()
        result = []
        threading.Thread(target=lambda: (result.append(batched.generate(
            None, QUESTIONS[0], max_new_tokens=4)), done.set()), daemon=True).start()
        assert done.wait(20), "the row of the closed stream was not freed"
        assert result[0].token_ids == served_vlm.generate(None, QUESTIONS[0],
                                                          max_new_tokens=4).token_ids
    finally:
        batched.close()


def test_rows_times_kv_memory_is_checked(served_vlm):
    from edgevlm.runtime.batched import BatchedVLM

    with pytest.raises(UserError, match="lower --parallel"):
        BatchedVLM.from_vlm(served_vlm, 10**9)


def test_the_engine_batches_where_it_may(served_vlm):
    from edgevlm.serve.engine import Engine
    from edgevlm.serve.metrics import Metrics

    def batched(parallel: int, batching: str) -> bool:
        engine = Engine(served_vlm, parallel, 4, None, Metrics(), batching)
        engine.close()
        return engine.batched

    assert batched(4, "auto") and batched(1, "on")
    assert not batched(1, "auto") and not batched(4, "off")


def test_batching_on_refuses_an_export_that_cannot(served_vlm, monkeypatch):
    from edgevlm.runtime.batched import BatchedVLM
    from edgevlm.serve.engine import batched_vlm

    monkeypatch.setattr(BatchedVLM, "supports", classmethod(lambda cls, vlm: "a reason"))
    assert batched_vlm(served_vlm, 4, "auto") is served_vlm
    with pytest.raises(UserError, match="--batching on.*a reason"):
        batched_vlm(served_vlm, 4, "on")
