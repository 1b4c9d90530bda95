"""Validate a stored dataset file and write its normalised rows and train/eval split beside it.

Files written in the dataset's folder (each via a temporary file and a rename, so a reader never
sees half a file):

- `normalized.jsonl`: the valid rows, one per line, in the normalised form of their format
  (see `formats/base.py`). `line` is the row's line in the upload.
- `split.json`: the split seed and the rows held out at the upload's eval fraction:
  `{"seed", "eval_fraction", "max_eval_rows", "train_rows", "eval_rows", "eval_lines": [...]}`.
  Rows are read, and a job's own eval fraction applied, by `store.iter_rows`.

Problems that make the whole file unusable raise `DatasetError` and write nothing; so does a file
whose normalised rows would pass `limits.output_max_bytes` (DatasetTooLarge, 413). Problems in
single rows are counted (all of them, by kind) and the first MAX_ERROR_DETAILS kept in detail;
with `drop_bad_rows` those rows are left out and the dataset is ready, otherwise it is invalid and
no job can use it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

from app.dataset_errors import DatasetFileError, DatasetFormatError, RowError
from app.dataset_store import (
    DEFAULT_EVAL_FRACTION,
    DEFAULT_SPLIT_SEED,
    MAX_EVAL_ROWS,
    NORMALIZED_FILENAME,
    SPLIT_FILENAME,
    eval_size,
    held_out_positions,
)
from app.models import DatasetStatus
from app.services.datasets.formats import detect_format, format_title
from app.services.datasets.formats.tools import with_file_tools
from app.services.datasets.readers import IngestLimits, read_rows, row_too_large

DETECTION_SAMPLE_ROWS = 50
MAX_ERROR_DETAILS = 50
# `{{name}}`, `{{ author }}`: left by identity-style templates (LLaMA-Factory's identity.json) that
# expect a substitution before training; trained as they are, the model learns the braces.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][\w.]*")
MAX_SUBSTITUTIONS = 50
MAX_SUBSTITUTION_CHARS = 1000


@dataclass
class IngestResult:
    """What validation found, in the numbers the dataset page shows."""

    format: str  # the format's name (formats/)
    file_type: str
    columns: dict[str, str]  # format field -> column of the file it was read from
    rows: int  # data rows in the file (blank lines not counted)
    valid_rows: int
    bad_rows: int  # rows with at least one error
    dropped_rows: int  # bad rows left out because drop_bad_rows was asked for
    error_count: int  # every error found, not only those kept in `errors`
    errors: list[dict[str, Any]]  # the first MAX_ERROR_DETAILS, in file order
    error_counts: dict[str, int]  # kind -> count, over all errors
    status: DatasetStatus
    train_rows: int
    eval_rows: int
    split_seed: int
    normalized_path: Path
    split_path: Path
    eval_lines: list[int] = field(default_factory=list, repr=False)
    # Rows that still hold template placeholders: {"rows", "names", "line", "example"}, or {}.
    placeholders: dict[str, Any] = field(default_factory=dict)
    # The substitutions asked for at upload (name -> value) and how often each was made.
    substitutions: dict[str, str] = field(default_factory=dict)
    substituted: dict[str, int] = field(default_factory=dict)
    # The upload's tools for every row (OpenAI tool definitions), taken by rows without their own.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_rows: int = 0  # rows that define tools: only models whose template takes tools train them

    @property
    def report(self) -> dict[str, Any]:
        """The part of the result kept in `Dataset.report`."""
        return {
            "format_name": format_title(self.format),
            "columns": self.columns,
            "bad_rows": self.bad_rows,
            "error_counts": self.error_counts,
            "errors_shown": len(self.errors),
            "train_rows": self.train_rows,
            **({"placeholders": self.placeholders} if self.placeholders else {}),
            **(
                {"substitutions": self.substitutions, "substituted": self.substituted}
                if self.substitutions
                else {}
            ),
            **({"tools": self.tools} if self.tools else {}),
            **({"tool_rows": self.tool_rows} if self.tool_rows else {}),
        }


def ingest_dataset(
    raw_path: Path,
    file_type: str,
    *,
    column_mapping: dict[str, str] | None = None,
    drop_bad_rows: bool = False,
    split_seed: int = DEFAULT_SPLIT_SEED,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    max_eval_rows: int = MAX_EVAL_ROWS,
    limits: IngestLimits | None = None,
    substitutions: dict[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> IngestResult:
    """Read, validate and normalise `raw_path`; write `normalized.jsonl` and `split.json` beside it.

    `substitutions` (checked by `check_substitutions`) replaces each `{{name}}` placeholder in the
    rows' texts with its value before they are written; placeholders left are reported. `tools`
    (checked by `formats.tools.check_tool_definitions`) go to every row without tools of its own
    (nor the file's top-level `tools`); only formats with tool calls take them.

    Raises DatasetFileError / DatasetFormatError when the file as a whole cannot be used, and
    DatasetTooLarge when its rows would take more than `limits.output_max_bytes`.
    """
    limits = limits or IngestLimits()
    rows_iter = read_rows(raw_path, file_type, limits)
    sample = list(islice(rows_iter, DETECTION_SAMPLE_ROWS))
    if not sample:
        raise DatasetFileError("The file has no rows", hint="Upload a file with at least one row.")
    records = [row.record for row in sample if row.record is not None]
    if not records:
        first = sample[0].error
        assert first is not None
        raise DatasetFileError(
            f"No row of the first {len(sample)} could be read; the first problem: {first.message}",
            line=first.line,
            field=first.field,
            hint=first.hint,
        )
    dataset_format = detect_format(records, column_mapping)
    tools_column = dataset_format.columns.get("tools")
    if tools and tools_column is None:
        raise DatasetFormatError(
            f"Tools for every row were given, but this file is {format_title(dataset_format.name)}"
            ", whose rows have no tool calls",
            field="tools",
            hint="Tools go with OpenAI messages or ShareGPT conversations that call them; leave "
            "the field empty for this file.",
        )

    rows = valid_rows = bad_rows = error_count = written = tool_rows = 0
    details: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    valid_lines = array("Q")  # 8 bytes a row: enough to pick the eval rows by line afterwards
    placeholders = _Placeholders()
    substituted: Counter[str] = Counter()
    folder = raw_path.parent
    normalized_path = folder / NORMALIZED_FILENAME
    with _atomic_file(normalized_path) as out:
        for raw in chain(sample, rows_iter):
            rows += 1
            normalized: dict[str, Any] | None = None
            if raw.error is not None:
                problems = [raw.error]
            else:
                assert raw.record is not None
                record = raw.record
                if tools and tools_column is not None:
                    record = with_file_tools(record, tools_column, tools)
                normalized, problems = dataset_format.normalize(raw.line, record)
            if normalized is not None and substitutions:
                normalized = _substitute(normalized, substitutions, substituted)
            if normalized is not None:
                encoded = _encode(normalized, raw.line)
                if not isinstance(encoded, RowError) and len(encoded) > limits.row_max_bytes:
                    encoded = row_too_large(raw.line, len(encoded), limits.row_max_bytes)
                if isinstance(encoded, RowError):
                    problems = [encoded]
                else:
                    written += len(encoded)
                    if written > limits.output_max_bytes:
                        raise limits.too_large(
                            f"the rows up to line {raw.line} already take {written} bytes "
                            "once normalised"
                        )
                    out.write(encoded)
                    placeholders.look_at(normalized)
                    tool_rows += "tools" in normalized
                    valid_lines.append(raw.line)
                    valid_rows += 1
                    continue
            bad_rows += 1
            for problem in problems:
                error_count += 1
                counts[problem.kind] += 1
                if len(details) < MAX_ERROR_DETAILS:
                    details.append(problem.to_dict())

    eval_count = eval_size(valid_rows, eval_fraction, max_eval_rows)
    positions = sorted(held_out_positions(valid_rows, split_seed, eval_fraction, max_eval_rows))
    eval_lines = [valid_lines[p] for p in positions]
    split_path = folder / SPLIT_FILENAME
    split = {
        "seed": split_seed,
        "eval_fraction": eval_fraction,
        "max_eval_rows": max_eval_rows,
        "train_rows": valid_rows - eval_count,
        "eval_rows": eval_count,
        "eval_lines": eval_lines,
    }
    with _atomic_file(split_path) as out:
        out.write(json.dumps(split).encode())

    usable = valid_rows > 0 and (bad_rows == 0 or drop_bad_rows)
    return IngestResult(
        format=dataset_format.name,
        file_type=file_type,
        columns=dataset_format.columns,
        rows=rows,
        valid_rows=valid_rows,
        bad_rows=bad_rows,
        dropped_rows=bad_rows if drop_bad_rows else 0,
        error_count=error_count,
        errors=details,
        error_counts=dict(counts.most_common()),
        status=DatasetStatus.ready if usable else DatasetStatus.invalid,
        train_rows=valid_rows - eval_count,
        eval_rows=eval_count,
        split_seed=split_seed,
        normalized_path=normalized_path,
        split_path=split_path,
        eval_lines=eval_lines,
        placeholders=placeholders.summary(),
        substitutions=dict(substitutions or {}),
        substituted={name: substituted[name] for name in substitutions or {}},
        tools=list(tools or []),
        tool_rows=tool_rows,
    )


def check_substitutions(substitutions: dict[str, Any]) -> dict[str, str]:
    """Placeholder name -> value, as ingest takes it; ValueError saying what is wrong."""
    if len(substitutions) > MAX_SUBSTITUTIONS:
        raise ValueError(
            f"There are {len(substitutions)} substitutions; at most {MAX_SUBSTITUTIONS} are taken"
        )
    checked = {}
    for name, value in substitutions.items():
        name = name.strip().removeprefix("{{").removesuffix("}}").strip()
        if not PLACEHOLDER_NAME.fullmatch(name):
            raise ValueError(
                f"The name {name!r} is not a placeholder name: a name is letters, digits, _ and . "
                "(as in {{name}} or {{author}}), starting with a letter or _"
            )
        if not isinstance(value, str):
            raise ValueError(f"The value for {name} must be text")
        if len(value) > MAX_SUBSTITUTION_CHARS:
            raise ValueError(
                f"The value for {name} has {len(value)} characters; at most "
                f"{MAX_SUBSTITUTION_CHARS} are taken"
            )
        checked[name] = value
    return checked


def _substitute(value: Any, substitutions: dict[str, str], counts: Counter[str]) -> Any:
    """The row with `{{name}}` replaced in every text (not in roles or line numbers)."""
    if isinstance(value, str):
        if "{{" not in value:
            return value

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in substitutions:
                return match.group(0)
            counts[name] += 1
            return substitutions[name]

        return PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(item, substitutions, counts) for item in value]
    if isinstance(value, dict):
        return {
            key: item if key in ("role", "line") else _substitute(item, substitutions, counts)
            for key, item in value.items()
        }
    return value


class _Placeholders:
    """Counts the rows that hold template placeholders, and keeps the first as an example."""

    def __init__(self) -> None:
        self.rows = 0
        self.names: Counter[str] = Counter()
        self.line = 0
        self.example = ""

    def look_at(self, row: dict[str, Any]) -> None:
        texts = [row["text"]] if "text" in row else [m["content"] for m in _messages(row)]
        found = [m for text in texts if "{{" in text for m in PLACEHOLDER.finditer(text)]
        if not found:
            return
        self.rows += 1
        self.names.update(m.group(1) for m in found)
        if not self.example:
            text = found[0].string
            start = max(0, found[0].start() - 60)
            self.line = row["line"]
            self.example = ("…" if start else "") + text[start : start + 160]

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        names = [name for name, _ in self.names.most_common(10)]
        return {"rows": self.rows, "names": names, "line": self.line, "example": self.example}


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """Every message of a normalised row: a conversation's, or a pair's prompt and answers."""
    if "messages" in row:
        return list(row["messages"])
    return [*row["prompt"], *row["chosen"], *row["rejected"]]


def _encode(row: dict[str, Any], line: int) -> bytes | RowError:
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON may spell an unpaired surrogate (\ud800); no tokenizer can take it.
        return RowError(
            line,
            None,
            "invalid_unicode",
            f"contains an unpaired surrogate {exc.object[exc.start]!r}, which is not valid Unicode",
            "Remove or fix the broken escape sequence (\\ud800-\\udfff) in this row.",
        )


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
