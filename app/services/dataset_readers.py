"""Stream the rows of a dataset file (.jsonl, .json, .csv, .parquet) with their line numbers.

A problem confined to one row (a JSONL line that is not JSON, a CSV row with too many values) is
yielded as a `RawRow` carrying a `RowError`, so the caller can report it and carry on. A problem
that makes the rest of the file unreadable (empty file, broken JSON document, an unclosed CSV quote,
invalid UTF-8 in a CSV, a truncated Parquet file) raises `DatasetFileError` with the line.

Plain json/csv/pyarrow on purpose: the web process must stay light (no `datasets` library here).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.services.dataset_errors import DatasetFileError, RowError, describe_type

ACCEPTED_FILE_TYPES = ("jsonl", "json", "csv", "parquet")
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_BATCH_ROWS = 1024
# csv refuses fields over 128 KiB by default; one long conversation in a cell is normal here, and
# the upload cap already bounds the file.
CSV_FIELD_LIMIT = 2**31 - 1

_UTF8_HINT = "Save the file as UTF-8 (most editors offer it under 'Save as' or 'Encoding')."


@dataclass(frozen=True)
class RawRow:
    """One row as read from the file: an object, or the error that kept it from being one."""

    line: int
    record: dict[str, Any] | None
    error: RowError | None = None


def read_rows(path: Path, file_type: str) -> Iterator[RawRow]:
    """Rows of `path` read as `file_type` (one of ACCEPTED_FILE_TYPES), in file order.

    Raises DatasetFileError at once for an unknown type or an empty file, and while iterating for
    a problem that leaves the rest of the file unreadable.
    """
    readers: dict[str, Callable[[Path], Iterator[RawRow]]] = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "parquet": _read_parquet,
    }
    reader = readers.get(file_type)
    if reader is None:
        accepted = ", ".join(f".{t}" for t in ACCEPTED_FILE_TYPES)
        raise DatasetFileError(
            f"unsupported file type .{file_type}; accepted types: {accepted}",
            hint="Convert the file to JSON Lines (.jsonl), the most widely supported format.",
        )
    if path.stat().st_size == 0:
        raise DatasetFileError("the file is empty", hint="Upload a file with at least one row.")
    return reader(path)


def _as_row(line: int, value: Any) -> RawRow:
    if isinstance(value, dict):
        return RawRow(line, value)
    return RawRow(
        line,
        None,
        RowError(
            line,
            None,
            "not_an_object",
            f'expected a JSON object (one example per row, e.g. {{"text": ...}}), '
            f"found {describe_type(value)}",
        ),
    )


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    # Binary lines: a bad byte sequence spoils only its own line, and readline stays linear in the
    # line length (a 10 MB row is one read, not a quadratic concatenation).
    with path.open("rb") as file:
        for line, raw in enumerate(file, start=1):
            if line == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(
                    line,
                    None,
                    RowError(
                        line,
                        None,
                        "invalid_utf8",
                        f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                        "of the line",
                        _UTF8_HINT,
                    ),
                )
                continue
            if not text.strip():
                continue  # blank lines (often a trailing newline or two) carry nothing
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = "Each line of a .jsonl file must be one complete JSON object."
                if line == 1 and text.lstrip().startswith("["):
                    hint = "This looks like one JSON array: name the file .json instead of .jsonl."
                elif _cut_short(exc):
                    hint = "The line ends in the middle of a value: " + hint
                yield RawRow(
                    line,
                    None,
                    RowError(line, None, "invalid_json", _json_problem(exc, line), hint),
                )
                continue
            yield _as_row(line, value)


def _read_json(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    if not data.strip(UTF8_BOM + b" \t\r\n"):
        raise DatasetFileError("the file is empty", hint="Upload a file with at least one row.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFileError(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x}",
            line=data.count(b"\n", 0, exc.start) + 1,
            hint=_UTF8_HINT,
        ) from None
    del data
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "A .json file must be one JSON array of objects."
        if exc.msg == "Extra data" and exc.lineno > 1:
            hint = "This looks like JSON Lines (one object per line): name the file .jsonl."
        elif _cut_short(exc):
            hint = (
                "The file ends in the middle of a value: it looks cut short (an unfinished "
                "download or copy). Upload the whole file."
            )
        raise DatasetFileError(_json_problem(exc, exc.lineno), line=exc.lineno, hint=hint) from None
    del text
    rows = _rows_of_document(document)
    for line, value in enumerate(rows, start=1):
        yield _as_row(line, value)


def _json_problem(exc: json.JSONDecodeError, line: int) -> str:
    """ "Invalid JSON at line 3, column 20: unterminated string" (Python's own words, which end
    in "at" or "starting at" before the position it leaves out)."""
    reason = exc.msg.removesuffix(" at").removesuffix(" starting")
    return f"Invalid JSON at line {line}, column {exc.colno}: {reason[:1].lower()}{reason[1:]}"


def _cut_short(exc: json.JSONDecodeError) -> bool:
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())


def _rows_of_document(document: Any) -> list[Any]:
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise DatasetFileError(
            f"expected a JSON array of examples, found {describe_type(document)}",
            hint='Write the file as [{"instruction": ..., "output": ...}, ...].',
        )
    list_fields = [key for key, value in document.items() if isinstance(value, list)]
    if len(list_fields) == 1:
        key = list_fields[0]
        if key in ("messages", "conversations"):
            raise DatasetFileError(
                f'the file is a single example (one object with a "{key}" list), '
                "expected an array of examples",
                field=key,
                hint="Wrap it in [ ... ] or write one example per line as .jsonl.",
            )
        return document[key]
    found = ", ".join(f'"{k}"' for k in list_fields) if list_fields else "none"
    raise DatasetFileError(
        "expected a JSON array of examples, or an object with exactly one list field holding "
        f"them; found an object whose list fields are: {found}",
        hint='Write the file as [{...}, {...}] or {"data": [{...}, {...}]}.',
    )


def _read_csv(path: Path) -> Iterator[RawRow]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    row_start = 1
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, strict=True)
            header = next(reader, None)
            while header == []:  # blank lines before the header
                row_start = reader.line_num + 1
                header = next(reader, None)
            if header is None:
                raise DatasetFileError("the file is empty", hint="Upload a file with a header row.")
            _check_header(header, row_start)
            row_start = reader.line_num + 1
            for values in reader:
                line, row_start = row_start, reader.line_num + 1
                if not values:
                    continue
                if len(values) != len(header):
                    yield RawRow(
                        line,
                        None,
                        RowError(
                            line,
                            None,
                            "wrong_field_count",
                            f"expected {len(header)} values (one per header column), "
                            f"found {len(values)}",
                            "A value that contains a comma or a line break must be in double "
                            'quotes, with inner quotes doubled ("").',
                        ),
                    )
                    continue
                yield RawRow(line, dict(zip(header, values, strict=True)))
    except csv.Error as exc:
        if "end of data" in str(exc):
            message = (
                f"unclosed quote: a quoted value in the row starting at line {row_start} "
                "runs to the end of the file"
            )
        else:
            message = f"broken CSV quoting: {exc}"
        raise DatasetFileError(
            message,
            line=row_start,
            hint='Quote values with double quotes and write a quote inside a value as "".',
        ) from None
    except UnicodeDecodeError:
        bad_line, detail = _first_invalid_utf8(path)
        raise DatasetFileError(
            f"not valid UTF-8: {detail}", line=bad_line, hint=_UTF8_HINT
        ) from None


def _check_header(header: list[str], line: int) -> None:
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name.strip():
            raise DatasetFileError(
                f"header column {position} has no name",
                line=line,
                hint="The first row of a CSV file must name every column.",
            )
        if name in seen:
            raise DatasetFileError(
                f'the header names column "{name}" twice',
                line=line,
                field=name,
                hint="Give every column a different name.",
            )
        seen.add(name)


def _first_invalid_utf8(path: Path) -> tuple[int | None, str]:
    with path.open("rb") as file:
        for line, raw in enumerate(file, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return line, f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line"
    return None, "the file ends in the middle of a character"


def _read_parquet(path: Path) -> Iterator[RawRow]:
    hint = (
        "The file may be truncated (an interrupted download or upload) or not Parquet at all. "
        "Export it again and re-upload."
    )
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFileError(f"not a readable Parquet file: {exc}", hint=hint) from None
    line = 0
    try:
        with parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    line += 1
                    yield RawRow(line, record)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFileError(
            f"the Parquet file is damaged after row {line}: {exc}", line=line + 1, hint=hint
        ) from None
