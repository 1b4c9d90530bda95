"""Tool-call rows, as the SFT formats bring them, in one normalised form.

OpenAI rows carry `tool_calls` on assistant messages, `tool` messages with the results and a
`tools` list; ShareGPT rows (LLaMA-Factory's `glaive_toolcall`) carry `function_call` and
`observation` turns and a `tools` column, often as JSON text. Both become the form chat templates
take (`apply_chat_template(messages, tools=tools)`):

- the row gains `"tools": [{"type": "function", "function": {"name", "description", "parameters"}}]`;
- an assistant message that calls gains `"tool_calls": [{"type": "function", "function":
  {"name", "arguments": {...}}}]` (arguments as a JSON object, as templates expect; `"id"` kept
  when the file has one), its `content` possibly "";
- a result is `{"role": "tool", "content": ..., "name"?, "tool_call_id"?}`.

A file may also give tools for every row (`check_tool_definitions`: the upload's field, or a JSON
file's top-level `tools` list); a row without tools of its own takes them (`with_file_tools`).

`check_calls` then finds what would train the model wrong: a call to a tool the row does not
define, and a call with no result (or a result with no call).
"""

from __future__ import annotations

import json
from typing import Any

from app.dataset_errors import RowError, describe_type

# ShareGPT speakers (LLaMA-Factory's tags first) that call a tool, and that answer for one.
CALL_ROLES = frozenset({"function_call", "tool_call", "tool_calls"})
RESULT_ROLES = frozenset({"observation", "tool", "function", "ipython"})

TOOLS_SHAPE = '[{"name", "description", "parameters"}]'
CALL_SHAPE = '{"name": ..., "arguments": {...}}'

Message = dict[str, Any]


def tool_list(
    record: dict[str, Any], column: str, line: int, errors: list[RowError]
) -> list[dict[str, Any]]:
    """The row's tool definitions in OpenAI's `{"type": "function", "function": {...}}` form.

    Taken as a list or as JSON text of one (LLaMA-Factory writes `"tools": "[...]"`); each
    definition as `{"name", ...}` or already wrapped as `{"type": "function", "function": {...}}`.
    A missing, null or empty column gives [].
    """
    value = record.get(column)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            errors.append(
                RowError(
                    line,
                    column,
                    "invalid_tools",
                    f"expected a list of tool definitions {TOOLS_SHAPE}, found text that is not "
                    "JSON",
                    "Write the tools as a JSON list, as OpenAI's `tools` parameter takes them.",
                )
            )
            return []
    if not isinstance(value, list):
        errors.append(
            RowError(
                line,
                column,
                "invalid_tools",
                f"expected a list of tool definitions {TOOLS_SHAPE}, found {describe_type(value)}",
            )
        )
        return []
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name.strip():
            errors.append(
                RowError(
                    line,
                    f"{column}[{index}]",
                    "invalid_tools",
                    f'expected a tool definition with a "name", found {describe_type(tool)}',
                    'Each tool reads {"name": ..., "description": ..., "parameters": {...}}.',
                )
            )
            continue
        tools.append({"type": "function", "function": dict(function)})
    return tools


MAX_FILE_TOOLS = 128  # what OpenAI's `tools` parameter takes


def check_tool_definitions(value: Any, where: str = "tools") -> list[dict[str, Any]]:
    """A list of tools for every row of a file, in OpenAI's form `[{"type": "function",
    "function": {"name", "description"?, "parameters"?}}]`; ValueError naming what is wrong and
    where (`tools[1].function.name is missing`)."""
    if not isinstance(value, list):
        raise ValueError(
            f"{where} must be a JSON list of tool definitions, found {describe_type(value)}"
        )
    if len(value) > MAX_FILE_TOOLS:
        raise ValueError(f"{where} lists {len(value)} tools; at most {MAX_FILE_TOOLS} are taken")
    names: set[str] = set()
    for index, tool in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{at} must be an object, found {describe_type(tool)}")
        if tool.get("type") != "function":
            found = "missing" if "type" not in tool else f"{json.dumps(tool['type'])[:40]}"
            raise ValueError(f'{at}.type must be "function", found {found}')
        function = tool.get("function")
        if function is None:
            raise ValueError(f"{at}.function is missing")
        if not isinstance(function, dict):
            raise ValueError(f"{at}.function must be an object, found {describe_type(function)}")
        name = function.get("name")
        if name is None or (isinstance(name, str) and not name.strip()):
            raise ValueError(f"{at}.function.name is missing")
        if not isinstance(name, str):
            raise ValueError(f"{at}.function.name must be text, found {describe_type(name)}")
        if name in names:
            raise ValueError(f'{at}.function.name "{name}" is defined twice')
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(
                f"{at}.function.description must be text, found {describe_type(description)}"
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(
                f"{at}.function.parameters must be a JSON Schema object, found "
                f"{describe_type(parameters)}"
            )
    return [{"type": "function", "function": dict(tool["function"])} for tool in value]


def with_file_tools(
    record: dict[str, Any], column: str, tools: list[dict[str, Any]]
) -> dict[str, Any]:
    """The row with the file's tools in `column` when it has none of its own."""
    own = record.get(column)
    return record if own not in (None, "", []) else {**record, column: tools}


def parse_call(value: Any, path: str, line: int, errors: list[RowError]) -> list[dict[str, Any]]:
    """One ShareGPT `function_call` turn's value (`{"name", "arguments"}`, or a list of them for
    parallel calls, as JSON text) as normalised tool calls."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            errors.append(
                RowError(
                    line,
                    path,
                    "invalid_tool_call",
                    f"a function call must be JSON {CALL_SHAPE}; this is not JSON",
                    "Write the call as JSON with the tool's name and its arguments object.",
                )
            )
            return []
    calls = value if isinstance(value, list) else [value]
    normalised = []
    for index, call in enumerate(calls):
        where = f"{path}[{index}]" if isinstance(value, list) else path
        function = call.get("function") if isinstance(call, dict) and "function" in call else call
        tool_call = openai_call(function, where, line, errors)
        if tool_call is not None:
            normalised.append(tool_call)
    return normalised


def openai_call(
    function: Any, path: str, line: int, errors: list[RowError], call_id: Any = None
) -> dict[str, Any] | None:
    """`{"name", "arguments"}` (arguments an object, or JSON text of one, as OpenAI sends them)
    as a normalised tool call, or None and its problem."""
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name.strip():
        errors.append(
            RowError(
                line,
                path,
                "invalid_tool_call",
                f"expected a function call {CALL_SHAPE}, found {describe_type(function)}",
            )
        )
        return None
    assert isinstance(function, dict)
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            errors.append(
                RowError(
                    line,
                    f"{path}.arguments",
                    "invalid_tool_arguments",
                    f'the arguments of the call to "{name}" are not JSON',
                    "Write the arguments as a JSON object of parameter names to values.",
                )
            )
            return None
    if not isinstance(arguments, dict):
        errors.append(
            RowError(
                line,
                f"{path}.arguments",
                "invalid_tool_arguments",
                f'the arguments of the call to "{name}" must be a JSON object, found '
                f"{describe_type(arguments)}",
                "Write the arguments as a JSON object of parameter names to values.",
            )
        )
        return None
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call_id, str) and call_id:
        call["id"] = call_id
    return call


def check_calls(
    messages: list[Message],
    tools: list[dict[str, Any]],
    column: str,
    tools_column: str,
    line: int,
    errors: list[RowError],
) -> None:
    """Every call names a tool of the row and gets its result before the next turn; every result
    answers a call. A conversation may end on a call: that row teaches the model to make it."""
    known = {tool["function"]["name"] for tool in tools}
    waiting = 0  # calls of the last calling turn still without a result
    ids: set[str] = set()  # their ids, where the file gives them
    for index, message in enumerate(messages):
        calls = message.get("tool_calls") or []
        if message["role"] == "tool":
            if waiting == 0:
                errors.append(
                    RowError(
                        line,
                        column,
                        "tool_result_without_call",
                        f"message {index + 1} is a tool result, but no tool call comes before it "
                        "that it could answer",
                        "Put the assistant's call before its result, or remove the result.",
                    )
                )
                return
            call_id = message.get("tool_call_id")
            if ids and call_id is not None and call_id not in ids:
                errors.append(
                    RowError(
                        line,
                        column,
                        "tool_result_without_call",
                        f'message {index + 1} answers the call "{call_id}", which is not among '
                        "the calls before it",
                        "Give the result the tool_call_id of the call it answers.",
                    )
                )
                return
            ids.discard(call_id or "")
            waiting -= 1
            continue
        if waiting:
            errors.append(_no_result(line, column, index))
            return
        for call in calls:
            name = call["function"]["name"]
            if name not in known:
                defined = ", ".join(f'"{n}"' for n in sorted(known)) or "no tools"
                errors.append(
                    RowError(
                        line,
                        tools_column,
                        "unknown_tool",
                        f'the row calls the tool "{name}", but its "{tools_column}" defines '
                        f"{defined}",
                        f'Add the definition of "{name}" to the row\'s tools (or to the tools '
                        "for every row), or fix the name in the call.",
                    )
                )
                return
        waiting = len(calls)
        ids = {call["id"] for call in calls if "id" in call}


def _no_result(line: int, column: str, index: int) -> RowError:
    return RowError(
        line,
        column,
        "tool_call_without_result",
        f"a tool call before message {index + 1} has no result: each call needs a tool "
        "(observation) turn with its result right after it",
        "Add the tool's result after the call, or remove the call.",
    )


def with_tools(row: dict[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The normalised row, with its tools when it has any."""
    return {**row, "tools": tools} if tools else row
