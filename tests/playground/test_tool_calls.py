"""Tool calling end to end: LLaMA-Factory glaive_toolcall and OpenAI tool transcripts upload with
no refused row, an adapter trains on them on the demo model (its template takes tools) on the CPU,
and the official `openai` client gets the call back from /v1 as `tool_calls`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from app.models import Adapter, BaseModelEntry, Dataset, DatasetStatus, Job, JobStatus
from app.services.datasets.ingest import ingest_dataset
from tests.playground.conftest import BASE, train_adapter

pytestmark = pytest.mark.slow

TOOL_ADAPTER = "job-2"
# Short on purpose: the demo tokenizer knows no JSON, so every character of the definitions is a
# token, and a short row keeps the CPU training brief.
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "parameters": {"properties": {"city": {}}}},
    }
]
QUESTION = "What is the weather in Paris?"
CALL = {"name": "weather", "arguments": {"city": "Paris"}}


def _tool_files(folder: Path) -> list[Path]:
    """The same tool transcript, many times, in both shapes: LLaMA-Factory's glaive_toolcall
    (a JSON array, `tools` as JSON text) and OpenAI's messages (ending on the call)."""
    glaive = [
        {
            "conversations": [
                {"from": "human", "value": QUESTION},
                {"from": "function_call", "value": json.dumps(CALL)},
                {"from": "observation", "value": '{"temp": 18}'},
                {"from": "gpt", "value": "18 degrees."},
            ],
            "tools": json.dumps([TOOLS[0]["function"]]),
        }
    ] * 8
    openai_rows = [
        {
            "messages": [
                {"role": "user", "content": QUESTION},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": CALL["name"], "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
            ],
            "tools": TOOLS,
        }
        for i in range(16)
    ]
    (folder / "glaive").mkdir()
    (folder / "openai").mkdir()
    glaive_file = folder / "glaive" / "original.json"
    glaive_file.write_text(json.dumps(glaive, indent=2))
    openai_file = folder / "openai" / "original.jsonl"
    openai_file.write_text("".join(json.dumps(row) + "\n" for row in openai_rows))
    return [glaive_file, openai_file]


@pytest.fixture(scope="module")
def tool_adapter(pg_settings, pg_db, trained, tmp_path_factory) -> str:
    rows = tmp_path_factory.mktemp("tool-rows") / "rows.jsonl"
    with rows.open("w") as out:
        for path in _tool_files(tmp_path_factory.mktemp("tool-files")):
            result = ingest_dataset(path, path.suffix[1:], eval_fraction=0.0)
            assert (result.status, result.bad_rows, result.dropped_rows) == ("ready", 0, 0)
            assert result.tool_rows == result.valid_rows
            out.write(result.normalized_path.read_text())
    started = time.monotonic()
    train_adapter(
        trained["model_dir"],
        rows,
        pg_settings.runs_dir / "2",
        keep=lambda row: True,
        dataset_id="1" * 32,
        max_steps=200,
        micro_batch_size=2,
        max_seq_len=256,
    )
    print(f"trained the tool adapter in {time.monotonic() - started:.0f} s")
    with pg_db.write() as s:
        s.add(Dataset(id="1" * 32, name="tools", status=DatasetStatus.ready, rows=24))
        s.flush()
        s.add(
            Job(
                id=2, name="tools", base_model=BASE, dataset_id="1" * 32, status=JobStatus.succeeded
            )
        )
        s.flush()
        s.add(Adapter(id=TOOL_ADAPTER, job_id=2, name="tools", base_model=BASE))
        if s.get(BaseModelEntry, "plain-model") is None:
            s.add(BaseModelEntry(name="plain-model", source="/nowhere", has_chat_template=True))
    return TOOL_ADAPTER


@pytest.fixture
def client(web_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{web_server}/v1", api_key="unused-on-loopback")


def test_the_adapter_calls_the_tool_through_v1(client, tool_adapter):
    answer = client.chat.completions.create(
        model=tool_adapter,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        temperature=0,
        max_tokens=100,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_choice_none_offers_no_tools_and_a_forced_call_is_refused(client, tool_adapter):
    """The adapter that calls `weather` for this question answers in words when tool_choice is
    "none" (OpenAI's meaning: no tool is called); forcing a call is a 400, not ignored."""
    request = dict(
        model=tool_adapter,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        temperature=0,
        max_tokens=100,
    )
    choice = client.chat.completions.create(**request, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason != "tool_calls", choice
    for forced in ("required", {"type": "function", "function": {"name": "weather"}}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**request, tool_choice=forced)
        assert caught.value.body["code"] == "unsupported_tool_choice", forced
        assert caught.value.body["hint"]


def test_a_streamed_tool_call_reaches_the_client_whole(client, tool_adapter):
    stream = client.chat.completions.create(
        model=tool_adapter,
        messages=[
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": QUESTION},
        ],
        tools=TOOLS,
        temperature=0,
        max_tokens=100,
        stream=True,
    )
    calls, reasons = [], []
    for part in stream:
        delta = part.choices[0].delta
        calls += delta.tool_calls or []
        reasons.append(part.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls"
    assert [c.function.name for c in calls] == ["weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}


def test_a_streamed_tool_call_ends_on_the_usage_of_the_answer(client, tool_adapter):
    request = {
        "model": tool_adapter,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 100,
    }
    answer = client.chat.completions.create(**request)
    *parts, last = client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    assert parts[-1].choices[0].finish_reason == "tool_calls"
    assert [c.function.name for p in parts for c in p.choices[0].delta.tool_calls or []] == [
        "weather"
    ]
    assert all(part.usage is None for part in parts)
    assert last.choices == [] and last.usage == answer.usage


def test_a_transcript_with_the_call_and_its_result_is_taken(client, tool_adapter):
    """The call (arguments as JSON text, as OpenAI sends them) and the `tool` result render with
    the template and the model answers."""
    answer = client.chat.completions.create(
        model=tool_adapter,
        messages=[
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
        ],
        tools=TOOLS,
        temperature=0,
        max_tokens=20,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > 60  # the definitions, the call and the result


def test_tools_for_a_model_without_tool_support_are_a_clear_400(client, tool_adapter):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="plain-model",
            messages=[{"role": "user", "content": QUESTION}],
            tools=TOOLS,
        )
    error = caught.value.body
    assert error["code"] == "tools_unsupported"
    assert "chat template of plain-model has no tool support" in error["message"]
    assert BASE in error["hint"]


def _new_session(web_server: str, model: str) -> int:
    r = httpx.post(
        f"{web_server}/playground/sessions",
        data={"model_a": model, "model_b": "", "system_prompt": ""},
        headers={"origin": web_server},
    )
    assert r.status_code == 303, r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


def _playground_turn(web_server: str, session_id: int, tools: str) -> httpx.Response:
    return httpx.post(
        f"{web_server}/playground/sessions/{session_id}/chat?pane=0",
        json={"message": QUESTION, "temperature": 0, "max_new_tokens": 100, "tools": tools},
        headers={"origin": web_server},
        timeout=300,
    )


def test_the_playground_takes_tools_and_streams_the_call_as_a_call(web_server, tool_adapter):
    session_id = _new_session(web_server, tool_adapter)
    response = _playground_turn(web_server, session_id, json.dumps(TOOLS))
    assert response.status_code == 200, response.text
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"]
        for line in response.text.splitlines()
        if line.startswith("data: {")
    ]
    calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    page = httpx.get(
        f"{web_server}/playground/sessions/{session_id}", headers={"accept": "text/html"}
    ).text
    assert 'class="tool-call" data-tool="weather"' in page  # kept, and shown as a call


def test_the_playground_says_what_is_wrong_with_its_tools(web_server, tool_adapter):
    session_id = _new_session(web_server, tool_adapter)
    response = _playground_turn(web_server, session_id, "[{name: weather}]")
    assert response.status_code == 400
    assert "The tools are not JSON" in response.json()["error"]["message"]
    plain = _new_session(web_server, "plain-model")
    response = _playground_turn(web_server, plain, json.dumps(TOOLS))
    assert response.status_code == 400
    assert "has no tool support" in response.json()["error"]["message"]
