"""Tool calling as both processes see it: whether a chat template takes tools, and how a model's
answer holds its calls.

The web process cannot load a tokenizer, so it judges a model by its chat template's text (kept
when the model is registered); the worker judges the template it trains with the same way. An
answer's calls are read by the conventions chat templates teach: Hermes/Qwen-style
`<tool_call>{"name", "arguments"}</tool_call>` blocks, Mistral's `[TOOL_CALLS][{...}]` list, and
Llama 3.1's bare `{"name", "parameters"}` JSON answer.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

_TOOLS_IN_TEMPLATE = re.compile(r"\btools\b|\btool_calls\b")
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_PREFIX = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders tool definitions and calls (it uses `tools` or
    `tool_calls`); a template that does not would drop them silently."""
    return bool(template and _TOOLS_IN_TEMPLATE.search(template))


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The answer's text outside its calls, and the calls in OpenAI's response form
    (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`). No call found:
    the text as it is and []. Bare JSON answers count as calls only when they name one of
    `tool_names`, so an answer that is merely JSON stays text."""
    if "<tool_call>" in text:
        calls = [_call(block) for block in _TAGGED_CALL.findall(text)]
        if calls and all(call is not None for call in calls):
            content = _TAGGED_CALL.sub("", text).strip()
            return content, [c for c in calls if c is not None]
        return text, []
    bare = text.strip()
    for prefix in (_MISTRAL_PREFIX, _PYTHON_TAG):
        bare = bare.removeprefix(prefix).strip()
    if not bare.startswith(("{", "[")):
        return text, []
    try:
        value = json.loads(bare)
    except (ValueError, RecursionError):
        return text, []
    found = [_from_object(item) for item in (value if isinstance(value, list) else [value])]
    if found and all(call is not None and call[0] in tool_names for call in found):
        return "", [_response_call(name, args) for name, args in (c for c in found if c)]
    return text, []


def _call(block: str) -> dict[str, Any] | None:
    try:
        value = json.loads(block)
    except (ValueError, RecursionError):
        return None
    found = _from_object(value)
    return _response_call(*found) if found else None


def _from_object(value: Any) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def _response_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI request message as chat templates take it: calls' JSON-text arguments as
    objects (templates write them with `tojson`), absent fields left out."""
    out = {key: value for key, value in message.items() if value is not None}
    calls = out.get("tool_calls")
    if calls:
        out["tool_calls"] = [_template_call(call) for call in calls]
        out.setdefault("content", "")
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # Not JSON: the template writes it as the text it is.
        with contextlib.suppress(ValueError, RecursionError):
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "function": function}
