"""Tool-call datasets (LLaMA-Factory's glaive_toolcall, OpenAI tool transcripts) through
`ingest_dataset`: one normalised form, and bad rows reported by line."""

from __future__ import annotations

from tests.services.test_dataset_ingest import ingest, normalized_rows

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}


def test_glaive_toolcall_rows_normalise_to_openai_tool_messages(tmp_path):
    result = ingest(tmp_path, "glaive_toolcall.json")
    assert (result.format, result.status, result.valid_rows, result.bad_rows) == (
        "sharegpt",
        "ready",
        4,
        0,
    )
    plain, area, discount, refusal = normalized_rows(result)
    assert "tools" not in plain  # "tools": "[]" defines nothing
    assert [t["function"]["name"] for t in area["tools"]] == [
        "calculate_area",
        "calculate_discount",
    ]
    assert area["tools"][0]["type"] == "function"
    assert [m["role"] for m in area["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    call = area["messages"][1]
    assert call["content"] == ""
    assert call["tool_calls"] == [
        {
            "type": "function",
            "function": {
                "name": "calculate_area",
                "arguments": {"shape": "rectangle", "dimensions": [5, 3]},
            },
        }
    ]
    assert area["messages"][2] == {"role": "tool", "content": '{"area": 15}'}
    assert discount["messages"][1]["tool_calls"][0]["function"]["arguments"] == {
        "original_price": 200,
        "discount_percentage": 20,
    }
    # tools defined, none called: the row teaches when not to call
    assert refusal["tools"][0]["function"]["name"] == "get_weather"
    assert result.report["tool_rows"] == 3


def test_openai_tool_transcripts_keep_ids_and_parse_string_arguments(tmp_path):
    result = ingest(tmp_path, "openai_tools.jsonl")
    assert (result.format, result.status, result.valid_rows, result.bad_rows) == (
        "openai",
        "ready",
        4,
        0,
    )
    single, parallel, ends_on_call, plain = normalized_rows(result)
    assert single["tools"] == [WEATHER]
    assert single["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                "id": "call_abc123",
            }
        ],
    }
    assert single["messages"][3] == {
        "role": "tool",
        "content": '{"temperature": 18, "condition": "cloudy"}',
        "tool_call_id": "call_abc123",
    }
    assert len(parallel["messages"][1]["tool_calls"]) == 2
    # a conversation may end on the call: it teaches the model to make it
    assert ends_on_call["messages"][0]["role"] == "system"  # "developer" is a system prompt
    assert ends_on_call["messages"][-1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "London"
    }
    assert "tools" not in plain
    assert result.report["tool_rows"] == 3


def test_bad_tool_rows_are_reported_by_line_with_what_to_do(tmp_path):
    result = ingest(tmp_path, "openai_tools_bad.jsonl")
    assert (result.status, result.valid_rows, result.bad_rows) == ("invalid", 1, 3)
    no_result, not_json, unknown = result.errors
    assert (no_result["line"], no_result["kind"]) == (1, "tool_call_without_result")
    assert "has no result" in no_result["message"] and no_result["hint"]
    assert (not_json["line"], not_json["field"], not_json["kind"]) == (
        2,
        "messages[1].tool_calls[0].function.arguments",
        "invalid_tool_arguments",
    )
    assert 'call to "get_weather" are not JSON' in not_json["message"]
    assert (unknown["line"], unknown["field"], unknown["kind"]) == (3, "tools", "unknown_tool")
    assert '"book_flight"' in unknown["message"] and '"get_weather"' in unknown["message"]


def test_bad_glaive_rows_are_reported_by_line(tmp_path):
    result = ingest(tmp_path, "glaive_toolcall_bad.json")
    assert (result.status, result.valid_rows, result.bad_rows) == ("invalid", 1, 2)
    not_json, orphan = result.errors
    assert (not_json["line"], not_json["field"], not_json["kind"]) == (
        1,
        "conversations[1].value",
        "invalid_tool_call",
    )
    assert (orphan["line"], orphan["kind"]) == (2, "tool_result_without_call")


def test_tool_turns_in_preference_pairs_are_still_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"conversations": [{"from": "human", "value": "Weather?"}, '
        '{"from": "function_call", "value": "{}"}], '
        '"chosen": {"from": "gpt", "value": "Sunny."}, '
        '"rejected": {"from": "gpt", "value": "Rain."}}\n'
    )
    from app.services.datasets.ingest import ingest_dataset

    result = ingest_dataset(path, "jsonl")
    assert result.format == "sharegpt_preference"
    assert result.errors[0]["kind"] == "tool_call_turn"
