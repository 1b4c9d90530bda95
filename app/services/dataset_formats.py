"""Recognise a dataset's format from its rows and normalise each row to one conversation form.

Formats: Alpaca (`instruction`, optional `input`, `output`), ShareGPT (`conversations` of
`{from, value}`), OpenAI chat (`messages` of `{role, content}`), prompt/completion, plain `text`.
Preference data (`chosen`/`rejected`) is recognised and refused with a way forward.

A normalised row is `{"line": N, "messages": [{"role": ..., "content": ...}, ...]}` with roles
system/user/assistant, or `{"line": N, "text": ...}` for plain text. Content is kept exactly as
written (no stripping); only empty system turns are left out, since they carry nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.services.dataset_errors import DatasetFormatError, RowError, describe_type

# Each field belongs to exactly one format, so a column mapping names its format by its keys.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations", "system"),
    "openai": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "openai": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMAT_NAMES = {
    "alpaca": "Alpaca",
    "sharegpt": "ShareGPT",
    "openai": "OpenAI chat",
    "prompt_completion": "prompt/completion",
    "text": "plain text",
}

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

_SHAPES = (
    'Alpaca {"instruction", "input" (optional), "output"}; ShareGPT {"conversations": '
    '[{"from", "value"}]}; OpenAI chat {"messages": [{"role", "content"}]}; '
    '{"prompt", "completion"}; plain {"text"}'
)
# Leaving the row out ("drop bad rows") is offered by the page, only while the rows are still in.
_TOOL_HINT = "Remove the tool-call turns, and the replies that depend on them, from the file."


@dataclass(frozen=True)
class DatasetFormat:
    """A recognised format and, for each of its fields, the column of the file that holds it."""

    name: str
    columns: dict[str, str]


def detect_format(
    records: Iterable[dict[str, Any]], column_mapping: dict[str, str] | None = None
) -> DatasetFormat:
    """The format of a sample of rows (the first few of the file), or DatasetFormatError.

    A column mapping (format field -> column in the file) overrides detection: its keys name the
    format, and every mapped column must occur in the sample.
    """
    records = list(records)
    columns_seen: dict[str, None] = {}  # ordered set, for messages that list the file's columns
    for record in records:
        columns_seen.update(dict.fromkeys(record))
    found = ", ".join(f'"{c}"' for c in columns_seen) or "none"
    _refuse_multimodal(records)

    if column_mapping:
        dataset_format = _format_from_mapping(column_mapping)
    else:
        dataset_format = _format_from_columns(records, found)

    for field, column in dataset_format.columns.items():
        if column in columns_seen or field not in REQUIRED_FIELDS[dataset_format.name]:
            continue
        if column_mapping and field in column_mapping:
            message = f'column "{column}" (mapped to "{field}") is not in the file'
        else:
            message = f'column "{column}" is not in the file'
        raise DatasetFormatError(
            f"{message}; columns found: {found}",
            field=column,
            hint=f'Map the field to one of your columns, e.g. {{"{field}": "<column name>"}}.',
        )
    for field, column in (column_mapping or {}).items():
        if column not in columns_seen:
            raise DatasetFormatError(
                f'column "{column}" (mapped to "{field}") is not in the file; '
                f"columns found: {found}",
                field=column,
                hint="Check the spelling: column names are case-sensitive.",
            )
    return dataset_format


# Columns that carry media beside the text (LLaMA-Factory's mllm_demo.json, ShareGPT/OpenAI
# multimodal exports), with the placeholder each leaves in the text.
MEDIA_COLUMNS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}


def _refuse_multimodal(records: list[dict[str, Any]]) -> None:
    """A multimodal file would train as text: its media dropped, its placeholders learned as words."""
    for record in records:
        for column, placeholder in MEDIA_COLUMNS.items():
            if record.get(column):
                raise DatasetFormatError(
                    f'This is a multimodal dataset: its rows have an "{column}" column (and '
                    f"{placeholder} placeholders in the text). Tuneboard fine-tunes text-only "
                    f"models; it would drop the {column} and train on {placeholder} as if it "
                    "were a word.",
                    field=column,
                    hint=f'Upload text-only rows (without the "{column}" column and the '
                    f"{placeholder} placeholders), or train it with a tool for vision-language "
                    "models.",
                )


def _format_from_mapping(column_mapping: dict[str, str]) -> DatasetFormat:
    formats = set()
    for field, column in column_mapping.items():
        owner = next((f for f, fields in FORMAT_FIELDS.items() if field in fields), None)
        if owner is None:
            known = ", ".join(f'"{f}"' for fields in FORMAT_FIELDS.values() for f in fields)
            raise DatasetFormatError(
                f'unknown field "{field}" in the column mapping; known fields: {known}',
                field=field,
                hint='A mapping reads {"<field>": "<your column>"}, e.g. {"prompt": "question"}.',
            )
        if not isinstance(column, str) or not column:
            raise DatasetFormatError(
                f'the column mapping for "{field}" must be a column name, '
                f"found {describe_type(column)}",
                field=field,
            )
        formats.add(owner)
    if len(formats) > 1:
        names = " and ".join(sorted(FORMAT_NAMES[f] for f in formats))
        raise DatasetFormatError(
            f"the column mapping mixes fields of {names}; map the fields of one format only",
            hint=f"Formats and their fields: {_SHAPES}.",
        )
    name = formats.pop()
    columns = {field: column_mapping.get(field, field) for field in FORMAT_FIELDS[name]}
    return DatasetFormat(name, columns)


def _format_from_columns(records: list[dict[str, Any]], found: str) -> DatasetFormat:
    votes: Counter[str] = Counter()
    for record in records:
        keys = record.keys()
        if "chosen" in keys and "rejected" in keys:
            raise _preference_error(record)
        name = _format_of_keys(keys)
        if name is not None:
            votes[name] += 1
    if not votes:
        raise DatasetFormatError(
            f"could not recognise the dataset format from its columns ({found}); expected one of: "
            f"{_SHAPES}",
            hint='Rename the columns, or give a column mapping such as {"prompt": "question", '
            '"completion": "answer"}.',
        )
    # Most rows decide; a tie goes to the format listed first in FORMAT_FIELDS.
    order = list(FORMAT_FIELDS)
    name = max(votes, key=lambda n: (votes[n], -order.index(n)))
    return DatasetFormat(name, {field: field for field in FORMAT_FIELDS[name]})


def _format_of_keys(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _preference_error(record: dict[str, Any]) -> DatasetFormatError:
    conversational = isinstance(record.get("chosen"), list)
    if conversational:
        how = 'the column mapping {"messages": "chosen"}'
    elif "prompt" in record:
        how = 'the column mapping {"prompt": "prompt", "completion": "chosen"}'
    else:
        how = 'the column mapping {"text": "chosen"}'
    return DatasetFormatError(
        'this is preference (DPO) data: each row pairs a "chosen" and a "rejected" answer. '
        "Supervised fine-tuning (SFT), which Tuneboard runs, learns from one answer per example "
        "and cannot use the rejected one.",
        hint=f"To fine-tune on the preferred answers only, upload it again with {how}, "
        "or convert it to prompt/completion or messages rows. Preference training (DPO) is not "
        "supported yet.",
    )


def normalize_row(
    dataset_format: DatasetFormat, line: int, record: dict[str, Any]
) -> tuple[dict[str, Any] | None, list[RowError]]:
    """One row in the normalised form, or None and every problem found in it."""
    errors: list[RowError] = []
    columns = dataset_format.columns
    name = dataset_format.name
    if name == "text":
        text = _text(record, columns["text"], line, errors)
        return ({"line": line, "text": text} if not errors else None), errors
    if name == "alpaca":
        instruction = _text(record, columns["instruction"], line, errors)
        extra = _text(record, columns["input"], line, errors, required=False)
        output = _text(record, columns["output"], line, errors)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif name == "prompt_completion":
        prompt = _text(record, columns["prompt"], line, errors)
        completion = _text(record, columns["completion"], line, errors)
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
    elif name == "sharegpt":
        messages = _sharegpt_messages(record, columns, line, errors)
    else:
        messages = _openai_messages(record, columns["messages"], line, errors)
    return ({"line": line, "messages": messages} if not errors else None), errors


def _text(
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


def _turn_list(
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


def _require_assistant(
    messages: list[dict[str, str]], column: str, line: int, errors: list[RowError]
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


def _sharegpt_messages(
    record: dict[str, Any], columns: dict[str, str], line: int, errors: list[RowError]
) -> list[dict[str, str]]:
    column = columns["conversations"]
    turns = _turn_list(record, column, line, errors, '[{"from": ..., "value": ...}]')
    messages: list[dict[str, str]] = []
    system = record.get(columns["system"])
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    elif system is not None and not isinstance(system, str):
        errors.append(
            RowError(
                line,
                columns["system"],
                "wrong_type",
                f"expected a string, found {describe_type(system)}",
            )
        )
    for index, turn in enumerate(turns or ()):
        path = f"{column}[{index}]"
        if not isinstance(turn, dict):
            errors.append(
                RowError(
                    line,
                    path,
                    "wrong_type",
                    f'expected a turn {{"from": ..., "value": ...}}, found {describe_type(turn)}',
                )
            )
            continue
        # Some ShareGPT exports use OpenAI's key names inside "conversations"; accept both.
        role_key = "from" if "from" in turn or "role" not in turn else "role"
        content_key = "value" if "value" in turn or "content" not in turn else "content"
        role = _role(turn, role_key, path, line, errors, SHAREGPT_ROLES, "human, gpt, system")
        content = turn.get(content_key)
        if content_key not in turn:
            errors.append(
                RowError(
                    line,
                    f"{path}.{content_key}",
                    "missing_field",
                    "missing; expected the turn's text",
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
            _append_turn(messages, role, content, f"{path}.{content_key}", line, errors)
    if turns:
        _require_assistant(messages, column, line, errors)
    return messages


def _openai_messages(
    record: dict[str, Any], column: str, line: int, errors: list[RowError]
) -> list[dict[str, str]]:
    turns = _turn_list(record, column, line, errors, '[{"role": ..., "content": ...}]')
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns or ()):
        path = f"{column}[{index}]"
        if not isinstance(turn, dict):
            errors.append(
                RowError(
                    line,
                    path,
                    "wrong_type",
                    f'expected a message {{"role": ..., "content": ...}}, '
                    f"found {describe_type(turn)}",
                )
            )
            continue
        role = _role(turn, "role", path, line, errors, OPENAI_ROLES, "system, user, assistant")
        if role is None:
            continue
        if turn.get("tool_calls") or turn.get("function_call"):
            errors.append(
                RowError(
                    line,
                    f"{path}.tool_calls",
                    "tool_call_turn",
                    "this assistant turn makes a tool call; tool-call turns are not supported "
                    "for training",
                    _TOOL_HINT,
                )
            )
            continue
        content = _openai_content(turn, path, line, errors)
        if content is not None:
            _append_turn(messages, role, content, f"{path}.content", line, errors)
    if turns:
        _require_assistant(messages, column, line, errors)
    return messages


def _role(
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
                _TOOL_HINT,
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


def _openai_content(
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


def _append_turn(
    messages: list[dict[str, str]],
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
