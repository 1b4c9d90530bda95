"""OpenAI chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}`, where
`content` may also be a list of text parts; with tool calls, assistant messages carry `tool_calls`,
`tool` messages the results, and the row a `tools` list (normalised in formats/tools.py)."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError, describe_type
from app.services.datasets.formats.base import (
    OPENAI_ROLES,
    TOOL_HINT,
    DatasetFormat,
    Normalized,
    append_turn,
    openai_content,
    require_assistant,
    role_of,
    turn_list,
)
from app.services.datasets.formats.tools import check_calls, openai_call, tool_list, with_tools

MESSAGE_SHAPE = '{"role": ..., "content": ...}'


class OpenAIChat(DatasetFormat):
    name = "openai"
    title = "OpenAI chat"
    shape = '{"messages": [{"role", "content"}], "tools"?}'
    fields = ("messages", "tools")
    required = ("messages",)

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        column, tools_column = self.columns["messages"], self.columns["tools"]
        turns = turn_list(record, column, line, errors, f"[{MESSAGE_SHAPE}]")
        tools = tool_list(record, tools_column, line, errors)
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate(turns or ()):
            openai_turn(turn, f"{column}[{index}]", line, errors, messages, tools=True)
        require_assistant(messages, column, line, errors)
        if not errors:
            check_calls(messages, tools, column, tools_column, line, errors)
        row = with_tools({"line": line, "messages": messages}, tools)
        return (row if not errors else None), errors


def openai_turn(
    turn: Any,
    path: str,
    line: int,
    errors: list[RowError],
    messages: list[dict[str, Any]],
    *,
    tools: bool = False,
) -> None:
    """Append one `{"role", "content"}` message to `messages`, or its problems to `errors`. With
    `tools`, also assistant messages with `tool_calls` and `tool` results (else refused)."""
    if not isinstance(turn, dict):
        errors.append(
            RowError(
                line,
                path,
                "wrong_type",
                f"expected a message {MESSAGE_SHAPE}, found {describe_type(turn)}",
            )
        )
        return
    if tools and turn.get("role") == "tool":
        tool_result(turn, path, line, errors, messages)
        return
    role = role_of(turn, "role", path, line, errors, OPENAI_ROLES, "system, user, assistant")
    if role is None:
        return
    if tools and role == "assistant" and (turn.get("tool_calls") or turn.get("function_call")):
        tool_calls(turn, path, line, errors, messages)
        return
    if turn.get("tool_calls") or turn.get("function_call"):
        errors.append(
            RowError(
                line,
                f"{path}.tool_calls",
                "tool_call_turn",
                "this assistant turn makes a tool call; tool-call turns are not supported "
                "for training",
                TOOL_HINT,
            )
        )
        return
    content = openai_content(turn, path, line, errors)
    if content is not None:
        append_turn(messages, role, content, f"{path}.content", line, errors)


def tool_calls(
    turn: dict[str, Any], path: str, line: int, errors: list[RowError], messages: list[Any]
) -> None:
    """An assistant message that calls tools (`tool_calls`, or the older `function_call`)."""
    if turn.get("tool_calls"):
        raw = turn["tool_calls"]
        if not isinstance(raw, list):
            errors.append(
                RowError(
                    line,
                    f"{path}.tool_calls",
                    "invalid_tool_call",
                    f"expected a list of tool calls, found {describe_type(raw)}",
                )
            )
            return
        calls = [
            openai_call(
                call.get("function") if isinstance(call, dict) else call,
                f"{path}.tool_calls[{index}].function",
                line,
                errors,
                call.get("id") if isinstance(call, dict) else None,
            )
            for index, call in enumerate(raw)
        ]
    else:
        calls = [openai_call(turn["function_call"], f"{path}.function_call", line, errors)]
    content = turn.get("content") or ""
    if not isinstance(content, str):
        content = openai_content(turn, path, line, errors) or ""
    if all(call is not None for call in calls):
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})


def tool_result(
    turn: dict[str, Any], path: str, line: int, errors: list[RowError], messages: list[Any]
) -> None:
    """A `tool` message: the result of a call, its `tool_call_id` and `name` kept."""
    content = openai_content(turn, path, line, errors)
    if content is None:
        return
    message: dict[str, Any] = {"role": "tool", "content": content}
    for key in ("tool_call_id", "name"):
        if isinstance(turn.get(key), str):
            message[key] = turn[key]
    messages.append(message)
