"""What every dataset format shares: the `DatasetFormat` class each format subclasses, and the
checks its rows need (a text field, a list of turns, a role, a message's content).

A format says which fields it has (each one's default column name), which of them a row needs,
which training methods its rows suit, and how to turn one row into the normalised form:

- SFT rows: `{"line": N, "messages": [{"role", "content"}, ...]}` (roles system/user/assistant),
  or `{"line": N, "text": ...}` for plain text;
- preference rows: `{"line": N, "prompt": [messages], "chosen": [assistant messages],
  "rejected": [assistant messages]}`.

Content is kept exactly as written (no stripping); only empty system turns are left out, since
they carry nothing. Every problem is a `RowError` naming the line and the field as the user's file
spells it, with a path into nested values (`conversations[2].from`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from app.dataset_errors import RowError, describe_type

SFT_METHODS = ("sft",)
PREFERENCE_METHODS = ("dpo", "orpo")  # app.train_config.PREFERENCE_METHODS, as plain names

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TOOL_ROLES = frozenset(
    {"function_call", "function", "tool", "tool_call", "tool_calls", "observation", "ipython"}
)
# Leaving the row out ("drop bad rows") is offered by the page, only while the rows are still in.
TOOL_HINT = "Remove the tool-call turns, and the replies that depend on them, from the file."

Row = dict[str, Any]
Normalized = tuple[Row | None, list[RowError]]


class DatasetFormat:
    """One shape of dataset rows that users bring. Subclass it, fill in the class attributes and
    `normalize`, and add the class to `FORMATS` (formats/__init__.py): that is a new format."""

    name: ClassVar[str]  # stored on the dataset: "alpaca", "preference", ...
    title: ClassVar[str]  # in the user's words: "Alpaca"
    shape: ClassVar[str]  # what a row looks like, for messages: '{"prompt", "completion"}'
    fields: ClassVar[tuple[str, ...]]  # each field's default column is its own name
    required: ClassVar[tuple[str, ...]]  # a row with these columns is taken to be this format
    methods: ClassVar[tuple[str, ...]] = SFT_METHODS  # the training methods its rows suit

    def __init__(self, columns: Mapping[str, str] | None = None) -> None:
        # field -> the column of the file that holds it
        self.columns = {field: (columns or {}).get(field, field) for field in self.fields}

    @classmethod
    def recognises(cls, keys: set[str]) -> bool:
        """Whether a row with these columns looks like this format."""
        return set(cls.required) <= keys

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        """The row in the normalised form, or None and every problem found in it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.columns!r})"


def text_field(
    record: dict[str, Any], column: str, line: int, errors: list[RowError], *, required: bool = True
) -> str:
    if column not in record:
        if required:
            errors.append(
                RowError(line, column, "missing_field", "missing; expected a non-empty string")
            )
        return ""
    value = record[column]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        errors.append(
            RowError(line, column, "wrong_type", f"expected a string, found {describe_type(value)}")
        )
        return ""
    if required and not value.strip():
        errors.append(RowError(line, column, "empty_value", "is empty; expected non-empty text"))
    return value


def turn_list(
    record: dict[str, Any], column: str, line: int, errors: list[RowError], shape: str
) -> list[Any] | None:
    if column not in record:
        errors.append(
            RowError(line, column, "missing_field", f"missing; expected a list of turns {shape}")
        )
        return None
    turns = record[column]
    if isinstance(turns, str):
        # CSV cells (and some exports) hold the conversation as JSON text.
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            errors.append(
                RowError(
                    line,
                    column,
                    "wrong_type",
                    f"expected a list of turns {shape}, found a string that is not JSON",
                )
            )
            return None
    if not isinstance(turns, list | tuple):
        errors.append(
            RowError(
                line,
                column,
                "wrong_type",
                f"expected a list of turns {shape}, found {describe_type(turns)}",
            )
        )
        return None
    if not turns:
        errors.append(RowError(line, column, "empty_conversation", "the conversation has no turns"))
        return None
    return list(turns)


def require_assistant(
    messages: list[dict[str, Any]], column: str, line: int, errors: list[RowError]
) -> None:
    if not errors and not any(m["role"] == "assistant" for m in messages):
        errors.append(
            RowError(
                line,
                column,
                "no_assistant_turn",
                "the conversation has no assistant turn, so there is nothing to learn from",
                "Add the answer the model should give as an assistant turn.",
            )
        )


def role_of(
    turn: dict[str, Any],
    key: str,
    path: str,
    line: int,
    errors: list[RowError],
    roles: dict[str, str],
    expected: str,
) -> str | None:
    field = f"{path}.{key}"
    if key not in turn:
        errors.append(
            RowError(line, field, "missing_field", f"missing; expected one of {expected}")
        )
        return None
    value = turn[key]
    if not isinstance(value, str):
        errors.append(
            RowError(
                line,
                field,
                "wrong_type",
                f"expected one of {expected}, found {describe_type(value)}",
            )
        )
        return None
    normalised = value.strip().lower()
    if normalised in TOOL_ROLES:
        errors.append(
            RowError(
                line,
                field,
                "tool_call_turn",
                f'"{value}" is a tool-call turn; tool-call turns are not supported for training',
                TOOL_HINT,
            )
        )
        return None
    role = roles.get(normalised)
    if role is None:
        errors.append(
            RowError(
                line, field, "unsupported_role", f'expected one of {expected}, found "{value}"'
            )
        )
    return role


def openai_content(
    turn: dict[str, Any], path: str, line: int, errors: list[RowError]
) -> str | None:
    field = f"{path}.content"
    if "content" not in turn:
        errors.append(RowError(line, field, "missing_field", "missing; expected the message text"))
        return None
    content = turn["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        errors.append(
            RowError(
                line,
                field,
                "wrong_type",
                "expected a string or a list of text parts, found " + describe_type(content),
            )
        )
        return None
    texts = []
    for index, part in enumerate(content):
        part_field = f"{field}[{index}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part_type is not None and part_type != "text":
            errors.append(
                RowError(
                    line,
                    part_field,
                    "unsupported_content_part",
                    f'a "{part_type}" part cannot be trained; only text parts '
                    '{"type": "text", "text": ...} are supported',
                    "Remove image, audio and file parts, or drop these rows.",
                )
            )
        else:
            errors.append(
                RowError(
                    line,
                    part_field,
                    "wrong_type",
                    f'expected a text part {{"type": "text", "text": ...}}, '
                    f"found {describe_type(part)}",
                )
            )
    return "\n".join(texts) if len(texts) == len(content) else None


def append_turn(
    messages: list[dict[str, Any]],
    role: str,
    content: str,
    field: str,
    line: int,
    errors: list[RowError],
) -> None:
    if content.strip():
        messages.append({"role": role, "content": content})
    elif role != "system":  # an empty system prompt says nothing; leave it out
        errors.append(RowError(line, field, "empty_value", f"the {role} turn is empty"))
