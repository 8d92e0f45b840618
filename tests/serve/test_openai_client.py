"""The official `openai` client against a live server gets VLM.generate's greedy answers, with an
image as a data URL, streaming and not, with usage; and /v1/models lists the export."""

from __future__ import annotations

import pytest

from tests.serve.conftest import MODEL_ID, image_of, png_url

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")  # a dev dependency; importorskip only names it
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _ask(url: str | None, text: str = QUESTION) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_answers_equal_generate(client, served_vlm, seed):
    url = png_url(seed)
    want = served_vlm.generate(image_of(url), QUESTION, max_new_tokens=12)
    got = client.chat.completions.create(model=MODEL_ID, messages=_ask(url), max_tokens=12,
                                         temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want.finish_reason]
    assert got.usage.completion_tokens == want.timings.n_new_tokens
    assert got.usage.prompt_tokens == want.timings.n_prompt_tokens
    assert got.model_extra["timings"]["ttft_ms"] > 0


@pytest.mark.parametrize("seed", [3, 4])
def test_streamed_answers_equal_generate(client, served_vlm, seed):
    url = png_url(seed)
    want = served_vlm.generate(image_of(url), QUESTION, max_new_tokens=12)
    stream = client.chat.completions.create(model=MODEL_ID, messages=_ask(url), max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].usage.completion_tokens == want.timings.n_new_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None


def test_text_only_and_a_system_turn(client, served_vlm):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "How many shapes are there?"}]
    want = served_vlm.generate(None, messages, max_new_tokens=10)
    got = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.content == want.text


def test_sampling_with_a_seed_repeats(client):
    kwargs = {"model": MODEL_ID, "messages": _ask(png_url(5)), "max_tokens": 10,
              "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == a


def test_models_lists_the_export(client, served_vlm):
    (card,) = client.models.list().data
    assert card.id == MODEL_ID
    assert card.model_extra["family"] == served_vlm.info.family
    assert card.model_extra["precision"] == served_vlm.info.precision
