"""Reading a model's answer back as tool calls, by the conventions chat templates teach."""

from __future__ import annotations

import json

from app.tool_calls import parse_tool_calls, template_message, template_takes_tools


def _calls(text: str, names: set[str] | None = None) -> tuple[str, list[tuple[str, dict]]]:
    content, calls = parse_tool_calls(text, names or {"get_weather"})
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_blocks_are_calls_and_the_text_around_them_is_content():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'
    )
    assert _calls(text) == (
        "Let me look.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    )


def test_llama_and_mistral_json_calls_count_only_for_known_tools():
    assert _calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}') == (
        "",
        [("get_weather", {"city": "Oslo"})],
    )
    assert _calls('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]')[1] == [
        ("get_weather", {"city": "Oslo"})
    ]
    answer = '{"name": "Ada", "age": 36}'  # JSON the user asked for, not a call
    assert _calls(answer) == (answer, [])


def test_text_and_broken_calls_stay_text():
    assert _calls("It is sunny.") == ("It is sunny.", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert _calls(broken) == (broken, [])


def test_which_templates_take_tools():
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert template_takes_tools("{% for c in message.tool_calls %}{% endfor %}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_takes_tools(None)


def test_request_messages_get_object_arguments_for_the_template():
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }
    assert template_message(message) == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}],
    }
