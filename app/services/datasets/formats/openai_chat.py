"""OpenAI chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}`, where
`content` may also be a list of text parts."""

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

MESSAGE_SHAPE = '{"role": ..., "content": ...}'


class OpenAIChat(DatasetFormat):
    name = "openai"
    title = "OpenAI chat"
    shape = '{"messages": [{"role", "content"}]}'
    fields = ("messages",)
    required = ("messages",)

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        column = self.columns["messages"]
        turns = turn_list(record, column, line, errors, f"[{MESSAGE_SHAPE}]")
        messages: list[dict[str, str]] = []
        for index, turn in enumerate(turns or ()):
            openai_turn(turn, f"{column}[{index}]", line, errors, messages)
        require_assistant(messages, column, line, errors)
        return ({"line": line, "messages": messages} if not errors else None), errors


def openai_turn(
    turn: Any, path: str, line: int, errors: list[RowError], messages: list[dict[str, str]]
) -> None:
    """Append one `{"role", "content"}` message to `messages`, or its problems to `errors`."""
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
    role = role_of(turn, "role", path, line, errors, OPENAI_ROLES, "system, user, assistant")
    if role is None:
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
