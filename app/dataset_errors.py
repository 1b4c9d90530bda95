"""Typed dataset problems: one bad row (`RowError`), or a dataset that cannot be used (`DatasetError`).

Line numbers are 1-based: the physical line of a JSONL or CSV file, the row position in a JSON
array or a Parquet file. `field` is the column name as the user's file spells it, with a path into
nested values where that helps (`conversations[2].from`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.errors import UserError


@dataclass(frozen=True)
class RowError:
    """One problem in one row. A row may have several."""

    line: int
    field: str | None
    kind: str  # e.g. invalid_json, missing_field, wrong_type, empty_value, tool_call_turn
    message: str  # what is wrong, including what was expected
    hint: str | None = None

    def __post_init__(self) -> None:
        # Shown as sentences in the problems table: each starts with a capital letter, whichever
        # format wrote it ("missing; expected ..." -> "Missing; expected ...").
        object.__setattr__(self, "message", capitalized(self.message))
        if self.hint:
            object.__setattr__(self, "hint", capitalized(self.hint))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"Line {self.line}" + (f', field "{self.field}"' if self.field else "")
        return f"{where}: {self.message}"


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


class DatasetError(UserError):
    """A dataset that cannot be used, as a whole: shown to the user as-is, with its hint.

    The one dataset error of both processes: the web app raises it for an upload (422 with the
    line and field), the worker for rows it cannot train on (a failed job of kind "dataset").
    """

    code = "dataset_invalid"
    status_code = 422
    kind = "dataset"  # the failed job's error kind, when a training run raises it

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, hint or "")
        self.line = line
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint or None,
            "line": self.line,
            "field": self.field,
        }

    def to_json(self) -> dict[str, Any]:  # type: ignore[override]
        return {"error": self.to_dict()}

    def __str__(self) -> str:
        where = ""
        if self.line is not None:
            where = f"line {self.line}" + (f', field "{self.field}"' if self.field else "") + ": "
        elif self.field:
            where = f'field "{self.field}": '
        return where + self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(line={self.line!r}, field={self.field!r}, "
            f"message={self.message!r}, hint={self.hint or None!r})"
        )


class DatasetFileError(DatasetError):
    """The file cannot be read: empty, not UTF-8, broken JSON/CSV structure, truncated Parquet."""

    code = "dataset_file_invalid"


class DatasetFormatError(DatasetError):
    """The rows can be read but are not supervised fine-tuning data we recognise (or the column
    mapping does not fit the file)."""

    code = "dataset_format_invalid"


class DatasetTooLarge(DatasetError):
    """Reading the file would produce more than the operator allows (it decompresses or expands
    past the limit): refused whole, like an upload over the cap."""

    code = "dataset_too_large"
    status_code = 413


def describe_type(value: object) -> str:
    """A value's JSON type in words, for messages like "expected a string, found a number (42)"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, bytes | bytearray):
        return "binary data"
    return type(value).__name__
