"""ShareGPT: `{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}], "system"?}`;
with tool calls (LLaMA-Factory's `glaive_toolcall`), `function_call` turns hold the calls as JSON,
`observation` turns their results, and a `tools` column (JSON text or a list) the definitions."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError, describe_type
from app.services.datasets.formats.base import (
    SHAREGPT_ROLES,
    DatasetFormat,
    Normalized,
    append_turn,
    require_assistant,
    role_of,
    turn_list,
)
from app.services.datasets.formats.tools import (
    CALL_ROLES,
    RESULT_ROLES,
    check_calls,
    parse_call,
    tool_list,
    with_tools,
)

TURN_SHAPE = '{"from": ..., "value": ...}'


class ShareGPT(DatasetFormat):
    name = "sharegpt"
    title = "ShareGPT"
    shape = '{"conversations": [{"from", "value"}], "tools"?}'
    fields = ("conversations", "system", "tools")
    required = ("conversations",)

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        column, tools_column = self.columns["conversations"], self.columns["tools"]
        tools = tool_list(record, tools_column, line, errors)
        messages = sharegpt_messages(
            record, column, self.columns["system"], line, errors, tools=True
        )
        require_assistant(messages, column, line, errors)
        if not errors:
            check_calls(messages, tools, column, tools_column, line, errors)
        row = with_tools({"line": line, "messages": messages}, tools)
        return (row if not errors else None), errors


def sharegpt_messages(
    record: dict[str, Any],
    column: str,
    system_column: str,
    line: int,
    errors: list[RowError],
    *,
    tools: bool = False,
) -> list[dict[str, Any]]:
    """The row's system column (if any) and its conversation as messages; problems into `errors`.
    With `tools`, `function_call` and `observation` turns too (else refused)."""
    turns = turn_list(record, column, line, errors, f"[{TURN_SHAPE}]")
    messages: list[dict[str, Any]] = list(system_message(record, system_column, line, errors))
    for index, turn in enumerate(turns or ()):
        sharegpt_turn(turn, f"{column}[{index}]", line, errors, messages, tools=tools)
    return messages


def system_message(
    record: dict[str, Any], column: str, line: int, errors: list[RowError]
) -> list[dict[str, Any]]:
    """An optional system prompt column as a leading system message (none when empty)."""
    system = record.get(column)
    if isinstance(system, str) and system.strip():
        return [{"role": "system", "content": system}]
    if system is not None and not isinstance(system, str):
        errors.append(
            RowError(
                line, column, "wrong_type", f"expected a string, found {describe_type(system)}"
            )
        )
    return []


def sharegpt_turn(
    turn: Any,
    path: str,
    line: int,
    errors: list[RowError],
    messages: list[dict[str, Any]],
    *,
    tools: bool = False,
) -> None:
    """Append one `{"from", "value"}` turn to `messages`, or its problems to `errors`."""
    if not isinstance(turn, dict):
        errors.append(
            RowError(
                line,
                path,
                "wrong_type",
                f"expected a turn {TURN_SHAPE}, found {describe_type(turn)}",
            )
        )
        return
    # Some ShareGPT exports use OpenAI's key names inside "conversations"; accept both.
    role_key = "from" if "from" in turn or "role" not in turn else "role"
    content_key = "value" if "value" in turn or "content" not in turn else "content"
    speaker = turn.get(role_key)
    speaker = speaker.strip().lower() if isinstance(speaker, str) else None
    if tools and speaker in CALL_ROLES:
        calls = parse_call(turn.get(content_key), f"{path}.{content_key}", line, errors)
        if calls:
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        return
    if tools and speaker in RESULT_ROLES:
        role: str | None = "tool"
    else:
        role = role_of(turn, role_key, path, line, errors, SHAREGPT_ROLES, "human, gpt, system")
    content = turn.get(content_key)
    if content_key not in turn:
        errors.append(
            RowError(
                line, f"{path}.{content_key}", "missing_field", "missing; expected the turn's text"
            )
        )
    elif not isinstance(content, str):
        errors.append(
            RowError(
                line,
                f"{path}.{content_key}",
                "wrong_type",
                f"expected a string, found {describe_type(content)}",
            )
        )
    elif role is not None:
        append_turn(messages, role, content, f"{path}.{content_key}", line, errors)
