"""`stream_options: {"include_usage": true}` on /v1's streams, as OpenAI documents it and its
clients (the `openai` package, LangChain, LiteLLM, Open WebUI) read it: `usage: null` on every
chunk, then one chunk with `choices: []` and the usage of the whole request right before
`data: [DONE]`, the same figures the answer without streaming reports. `stream_options` without
`stream`, or of the wrong shape, is a 400 in OpenAI's shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.playground.conftest import ADAPTER_ID, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow

CHAT: dict[str, Any] = {
    "model": ADAPTER_ID,
    "messages": [{"role": "user", "content": QUESTION}],
    "temperature": 0,
    "max_tokens": 40,
}
PROMPTS = ["The Zephyr Kettle 3000 costs", "Hello"]
COMPLETION: dict[str, Any] = {
    "model": ADAPTER_ID,
    "prompt": PROMPTS,
    "temperature": 0,
    "max_tokens": 6,
}
WITH_USAGE = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture
def client(web_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{web_server}/v1", api_key="unused-on-loopback")


def streamed(web_server: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a stream, once `data: [DONE]` has closed it."""
    with httpx.stream("POST", f"{web_server}{path}", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def answered(web_server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{web_server}{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_official_client_gets_the_usage_the_whole_answer_reports(client):
    answer = client.chat.completions.create(**CHAT)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    *parts, last = client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    assert last.choices == []
    assert last.usage == answer.usage
    assert all(part.usage is None for part in parts)
    text = "".join(part.choices[0].delta.content or "" for part in parts)
    assert text.strip() == TRAINED_ANSWER == answer.choices[0].message.content.strip()


def test_every_chat_chunk_says_usage_null_and_the_last_has_no_choices(web_server):
    *parts, last = streamed(web_server, "/v1/chat/completions", {**CHAT, **WITH_USAGE})
    assert all("usage" in part and part["usage"] is None for part in parts)
    assert all(len(part["choices"]) == 1 for part in parts)
    assert parts[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == []
    assert last["object"] == "chat.completion.chunk"
    assert {part["id"] for part in parts} == {last["id"]}
    usage = answered(web_server, "/v1/chat/completions", CHAT)["usage"]
    assert last["usage"] == usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("options", [None, {"include_usage": False}, {"include_usage": None}, {}])
def test_without_include_usage_the_chunks_carry_no_usage(web_server, options):
    body: dict[str, Any] = {**CHAT, "stream": True}
    if options is not None:
        body["stream_options"] = options
    parts = streamed(web_server, "/v1/chat/completions", body)
    assert all("usage" not in part for part in parts)
    assert all(len(part["choices"]) == 1 for part in parts)


def test_a_legacy_stream_of_two_prompts_ends_on_the_usage_of_both(web_server):
    *parts, last = streamed(web_server, "/v1/completions", {**COMPLETION, **WITH_USAGE})
    assert all("usage" in part and part["usage"] is None for part in parts)
    closing = [p["choices"][0]["index"] for p in parts if p["choices"][0]["finish_reason"]]
    assert closing == [0, 1]
    assert last["choices"] == [] and last["object"] == "text_completion"
    assert {part["id"] for part in parts} == {last["id"]}
    assert last["usage"] == answered(web_server, "/v1/completions", COMPLETION)["usage"]
    one_by_one = [
        answered(web_server, "/v1/completions", {**COMPLETION, "prompt": p})["usage"]
        for p in PROMPTS
    ]
    assert last["usage"] == {k: sum(u[k] for u in one_by_one) for k in last["usage"]}


def test_the_official_client_gets_a_legacy_streams_usage(client):
    answer = client.completions.create(**COMPLETION)
    *parts, last = client.completions.create(
        **COMPLETION, stream=True, stream_options={"include_usage": True}
    )
    assert last.choices == [] and last.usage == answer.usage
    assert all(part.usage is None and len(part.choices) == 1 for part in parts)
    for index, choice in enumerate(answer.choices):
        assert "".join(p.choices[0].text for p in parts if p.choices[0].index == index) == (
            choice.text
        )


BAD_OPTIONS = [
    ({"stream_options": {"include_usage": True}}, "only allowed when 'stream' is enabled"),
    (
        {"stream": False, "stream_options": {"include_usage": False}},
        "only allowed when 'stream' is enabled",
    ),
    ({"stream": True, "stream_options": "include_usage"}, "stream_options"),
    ({"stream": True, "stream_options": ["include_usage"]}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("change", "named"), BAD_OPTIONS)
def test_misplaced_or_malformed_stream_options_are_a_400_saying_what_to_do(
    web_server, path, change, named
):
    body = CHAT if path == "/v1/chat/completions" else COMPLETION
    r = httpx.post(f"{web_server}{path}", json={**body, **change}, timeout=300)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named in error["message"]
    assert error["hint"]


def test_the_official_client_is_told_to_stream(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**CHAT, stream_options={"include_usage": True})
    assert caught.value.body["message"] == (
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    )
    assert "stream" in caught.value.body["hint"]
