"""Stream the rows of a dataset file (.jsonl, .json, .csv, .parquet) with their line numbers.

A problem confined to one row (a JSONL line that is not JSON, a CSV row with too many values) is
yielded as a `RawRow` carrying a `RowError`, so the caller can report it and carry on. A problem
that makes the rest of the file unreadable (empty file, broken JSON document, an unclosed CSV quote,
invalid UTF-8 in a CSV, a truncated Parquet file) raises `DatasetFileError` with the line.

What a file may produce is bounded (`IngestLimits`): a row bigger than `row_max_bytes` or nested
deeper than `max_nesting` is a row error, never decoded into Python objects; a Parquet file whose
metadata says it decompresses past `output_max_bytes` is refused before decoding, and its rows are
decoded in groups of at most DECODE_BATCH_BYTES, so a small file that expands enormously (one long
string dictionary-encoded in every row) costs bounded memory.

A .json file may be an array of rows or an object holding one list of them, maybe beside a
`tools` list that every row without its own takes (checked as a whole: a bad one is a
DatasetFileError naming the definition).

Plain json/csv/pyarrow on purpose: the web process must stay light (no `datasets` library here).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.dataset_errors import DatasetFileError, DatasetTooLarge, RowError, describe_type
from app.services.datasets.formats.tools import check_tool_definitions, with_file_tools
from app.settings import Settings

ACCEPTED_FILE_TYPES = ("jsonl", "json", "csv", "parquet")
UTF8_BOM = b"\xef\xbb\xbf"
PARQUET_BATCH_ROWS = 1024
# Rows of a Parquet file are turned into Python objects at most this many (decoded) bytes at a time.
DECODE_BATCH_BYTES = 16 * 1024 * 1024
# csv refuses fields over 128 KiB by default; one long conversation in a cell is normal here, and
# the upload cap already bounds the file.
CSV_FIELD_LIMIT = 2**31 - 1

_UTF8_HINT = "Save the file as UTF-8 (most editors offer it under 'Save as' or 'Encoding')."
_DEFAULTS = Settings.model_fields


@dataclass(frozen=True)
class IngestLimits:
    """What reading one dataset may produce; the defaults are the Settings defaults."""

    row_max_bytes: int = _DEFAULTS["dataset_row_max_bytes"].default
    output_max_bytes: int = int(
        _DEFAULTS["dataset_expansion_max"].default * _DEFAULTS["upload_max_bytes"].default
    )
    max_nesting: int = _DEFAULTS["dataset_max_nesting"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestLimits:
        return cls(
            row_max_bytes=settings.dataset_row_max_bytes,
            output_max_bytes=int(settings.dataset_expansion_max * settings.upload_max_bytes),
            max_nesting=settings.dataset_max_nesting,
        )

    def too_large(self, what: str) -> DatasetTooLarge:
        """The 413 for `what` ("the Parquet file decompresses to 9 GB, ...") past output_max_bytes."""
        return DatasetTooLarge(
            f"{what}: more than the limit of {self.output_max_bytes} bytes for a dataset's "
            "decoded rows (TUNEBOARD_DATASET_EXPANSION_MAX times the upload cap)",
            hint="Split the dataset into smaller files, or ask the operator to raise "
            "TUNEBOARD_DATASET_EXPANSION_MAX (or TUNEBOARD_UPLOAD_MAX_BYTES).",
        )


def row_too_large(line: int, size: int, limit: int) -> RowError:
    return RowError(
        line,
        None,
        "row_too_large",
        f"the row takes {size} bytes, more than the limit of {limit} bytes for one row",
        "Shorten or split this example, or ask the operator to raise "
        "TUNEBOARD_DATASET_ROW_MAX_BYTES.",
    )


def too_deeply_nested(line: int, limit: int) -> RowError:
    return RowError(
        line,
        None,
        "too_deeply_nested",
        f"arrays and objects are nested more than {limit} levels deep",
        "Chat data needs a few levels (a list of messages with a role and content); flatten "
        "this row, or ask the operator to raise TUNEBOARD_DATASET_MAX_NESTING.",
    )


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects in `value` nest more than `limit` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


@dataclass(frozen=True)
class RawRow:
    """One row as read from the file: an object, or the error that kept it from being one."""

    line: int
    record: dict[str, Any] | None
    error: RowError | None = None


def read_rows(path: Path, file_type: str, limits: IngestLimits | None = None) -> Iterator[RawRow]:
    """Rows of `path` read as `file_type` (one of ACCEPTED_FILE_TYPES), in file order.

    Raises DatasetFileError at once for an unknown type or an empty file, and while iterating for
    a problem that leaves the rest of the file unreadable; DatasetTooLarge for a file that would
    decode to more than `limits.output_max_bytes`.
    """
    limits = limits or IngestLimits()
    readers: dict[str, Callable[[Path, IngestLimits], Iterator[RawRow]]] = {
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_csv,
        "parquet": _read_parquet,
    }
    reader = readers.get(file_type)
    if reader is None:
        accepted = ", ".join(f".{t}" for t in ACCEPTED_FILE_TYPES)
        raise DatasetFileError(
            f"Unsupported file type .{file_type}; accepted types: {accepted}",
            hint="Convert the file to JSON Lines (.jsonl), the most widely supported format.",
        )
    if path.stat().st_size == 0:
        raise DatasetFileError("The file is empty", hint="Upload a file with at least one row.")
    return reader(path, limits)


def _as_row(line: int, value: Any, limits: IngestLimits) -> RawRow:
    if isinstance(value, dict):
        if nested_deeper_than(value, limits.max_nesting):
            return RawRow(line, None, too_deeply_nested(line, limits.max_nesting))
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


def _read_jsonl(path: Path, limits: IngestLimits) -> Iterator[RawRow]:
    # Binary lines: a bad byte sequence spoils only its own line, and readline stays linear in the
    # line length (a 10 MB row is one read, not a quadratic concatenation).
    with path.open("rb") as file:
        for line, raw in enumerate(file, start=1):
            if line == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            if len(raw) > limits.row_max_bytes:
                yield RawRow(line, None, row_too_large(line, len(raw), limits.row_max_bytes))
                continue
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
            except RecursionError:
                yield RawRow(line, None, too_deeply_nested(line, limits.max_nesting))
                continue
            yield _as_row(line, value, limits)


def _read_json(path: Path, limits: IngestLimits) -> Iterator[RawRow]:
    data = path.read_bytes()
    if not data.strip(UTF8_BOM + b" \t\r\n"):
        raise DatasetFileError("The file is empty", hint="Upload a file with at least one row.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFileError(
            f"Not valid UTF-8: byte 0x{data[exc.start]:02x}",
            line=data.count(b"\n", 0, exc.start) + 1,
            hint=_UTF8_HINT,
        ) from None
    del data
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid_json(exc) from None
    except RecursionError:
        # Some element is nested too deeply for the parser: read the array one element at a time
        # so that element becomes a row error and the others are kept.
        yield from _read_json_elements(text, limits)
        return
    del text
    rows, tools = _rows_of_document(document)
    for line, value in enumerate(rows, start=1):
        if tools and isinstance(value, dict):
            value = with_file_tools(value, "tools", tools)
        yield _as_row(line, value, limits)


def _invalid_json(exc: json.JSONDecodeError) -> DatasetFileError:
    hint = "A .json file must be one JSON array of objects."
    if exc.msg == "Extra data" and exc.lineno > 1:
        hint = "This looks like JSON Lines (one object per line): name the file .jsonl."
    elif _cut_short(exc):
        hint = (
            "The file ends in the middle of a value: it looks cut short (an unfinished "
            "download or copy). Upload the whole file."
        )
    return DatasetFileError(_json_problem(exc, exc.lineno), line=exc.lineno, hint=hint)


_JSON_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _read_json_elements(text: str, limits: IngestLimits) -> Iterator[RawRow]:
    """The rows of a top-level JSON array parsed one element at a time; an element too deeply
    nested to parse is a row error and skipped by matching its brackets."""

    def space(at: int) -> int:
        match = _JSON_SPACE.match(text, at)
        return match.end() if match else at

    at = space(1 if text.startswith("\ufeff") else 0)
    if not text.startswith("[", at):
        raise DatasetFileError(
            f"The JSON document is nested more than {limits.max_nesting} levels deep",
            line=text.count("\n", 0, at) + 1,
            hint='Write the file as [{"instruction": ..., "output": ...}, ...], one flat object '
            "per example.",
        )
    at = space(at + 1)
    line = 0
    while not text.startswith("]", at):
        line += 1
        try:
            value, at = _JSON_DECODER.raw_decode(text, at)
            yield _as_row(line, value, limits)
        except json.JSONDecodeError as exc:
            raise _invalid_json(exc) from None
        except RecursionError:
            yield RawRow(line, None, too_deeply_nested(line, limits.max_nesting))
            at = _skip_json_value(text, at)
        at = space(at)
        if text.startswith(",", at):
            at = space(at + 1)
        elif not text.startswith("]", at):
            raise DatasetFileError(
                "Invalid JSON: expected , or ] after an element of the array",
                line=text.count("\n", 0, at) + 1,
                hint="A .json file must be one JSON array of objects.",
            )


def _skip_json_value(text: str, at: int) -> int:
    """Where the array or object starting at `at` ends (brackets counted, strings skipped)."""
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text, at):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    raise DatasetFileError(
        "Invalid JSON: an array or object is never closed",
        line=text.count("\n", 0, at) + 1,
        hint="The file may be truncated; export it again.",
    )


def _json_problem(exc: json.JSONDecodeError, line: int) -> str:
    """ "Invalid JSON at line 3, column 20: unterminated string" (Python's own words, which end
    in "at" or "starting at" before the position it leaves out)."""
    reason = exc.msg.removesuffix(" at").removesuffix(" starting")
    return f"Invalid JSON at line {line}, column {exc.colno}: {reason[:1].lower()}{reason[1:]}"


def _cut_short(exc: json.JSONDecodeError) -> bool:
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())


def _rows_of_document(document: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """The examples of a JSON document, and the tools it gives every row: an array, or an object
    with one list of examples (`{"data": [...]}`), maybe beside a `tools` list."""
    if isinstance(document, list):
        return document, []
    if not isinstance(document, dict):
        raise DatasetFileError(
            f"Expected a JSON array of examples, found {describe_type(document)}",
            hint='Write the file as [{"instruction": ..., "output": ...}, ...].',
        )
    list_fields = [key for key, value in document.items() if isinstance(value, list)]
    row_fields = [key for key in list_fields if key != "tools"]
    if len(row_fields) == 1:
        key = row_fields[0]
        if key in ("messages", "conversations") and _is_one_conversation(document[key]):
            raise DatasetFileError(
                f'The file is a single example (one object with a "{key}" list), '
                "expected an array of examples",
                field=key,
                hint="Wrap it in [ ... ] or write one example per line as .jsonl.",
            )
        tools: list[dict[str, Any]] = []
        if "tools" in document:
            try:
                tools = check_tool_definitions(document["tools"])
            except ValueError as exc:
                raise DatasetFileError(
                    f"The file's top-level {exc}",
                    field="tools",
                    hint='Write the tools as OpenAI takes them: [{"type": "function", '
                    '"function": {"name": ..., "description": ..., "parameters": {...}}}].',
                ) from None
        return document[key], tools
    found = ", ".join(f'"{k}"' for k in list_fields) if list_fields else "none"
    raise DatasetFileError(
        "Expected a JSON array of examples, or an object with exactly one list field holding "
        f'them (and maybe a "tools" list for every row); found an object whose list fields '
        f"are: {found}",
        hint='Write the file as [{...}, {...}] or {"tools": [...], "data": [{...}, {...}]}.',
    )


def _is_one_conversation(items: list[Any]) -> bool:
    """Whether a top-level "messages" list holds turns ({"role"}, {"from"}) rather than examples."""
    first = items[0] if items else None
    return not isinstance(first, dict) or bool({"role", "from"} & first.keys())


def _read_csv(path: Path, limits: IngestLimits) -> Iterator[RawRow]:
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
                raise DatasetFileError("The file is empty", hint="Upload a file with a header row.")
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
                size = sum(len(value) for value in values)  # characters: bytes are at least as many
                if size > limits.row_max_bytes:
                    yield RawRow(line, None, row_too_large(line, size, limits.row_max_bytes))
                    continue
                yield RawRow(line, dict(zip(header, values, strict=True)))
    except csv.Error as exc:
        if "end of data" in str(exc):
            message = (
                f"Unclosed quote: a quoted value in the row starting at line {row_start} "
                "runs to the end of the file"
            )
        else:
            message = f"Broken CSV quoting: {exc}"
        raise DatasetFileError(
            message,
            line=row_start,
            hint='Quote values with double quotes and write a quote inside a value as "".',
        ) from None
    except UnicodeDecodeError:
        bad_line, detail = _first_invalid_utf8(path)
        raise DatasetFileError(
            f"Not valid UTF-8: {detail}", line=bad_line, hint=_UTF8_HINT
        ) from None


def _check_header(header: list[str], line: int) -> None:
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name.strip():
            raise DatasetFileError(
                f"Header column {position} has no name",
                line=line,
                hint="The first row of a CSV file must name every column.",
            )
        if name in seen:
            raise DatasetFileError(
                f'The header names column "{name}" twice',
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


def _read_parquet(path: Path, limits: IngestLimits) -> Iterator[RawRow]:
    hint = (
        "The file may be truncated (an interrupted download or upload) or not Parquet at all. "
        "Export it again and re-upload."
    )
    try:
        with pq.ParquetFile(path) as probe:
            metadata = probe.metadata
            # Strings read as dictionaries: a value repeated in every row is held once, not copied
            # per row, until the rows are turned into Python objects (in bounded groups, below).
            strings = [c.path for c in probe.schema if c.physical_type == "BYTE_ARRAY"]
        parquet = pq.ParquetFile(path, read_dictionary=strings)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFileError(f"Not a readable Parquet file: {exc}", hint=hint) from None
    decompressed = sum(
        metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)
    )
    if decompressed > limits.output_max_bytes:
        parquet.close()
        raise limits.too_large(f"the Parquet file decompresses to {decompressed} bytes")
    average_row = max(1, decompressed // max(1, metadata.num_rows))
    batch_rows = max(1, min(PARQUET_BATCH_ROWS, DECODE_BATCH_BYTES // average_row))
    line = 0
    try:
        with parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows):
                sizes = _row_sizes(batch)
                start = 0
                while start < batch.num_rows:
                    if sizes[start] > limits.row_max_bytes:
                        line += 1
                        yield RawRow(
                            line, None, row_too_large(line, sizes[start], limits.row_max_bytes)
                        )
                        start += 1
                        continue
                    end, group = start + 1, sizes[start]
                    while (
                        end < batch.num_rows
                        and sizes[end] <= limits.row_max_bytes
                        and group + sizes[end] <= DECODE_BATCH_BYTES
                    ):
                        group += sizes[end]
                        end += 1
                    for record in batch.slice(start, end - start).to_pylist():
                        line += 1
                        yield RawRow(line, record)
                    start = end
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFileError(
            f"The Parquet file is damaged after row {line}: {exc}", line=line + 1, hint=hint
        ) from None


def _row_sizes(batch: pa.RecordBatch) -> list[int]:
    """Each row's decoded size in bytes (string and binary bytes, 8 for any other value), from the
    Arrow arrays, without making Python objects of the values."""
    total = pa.array([0] * batch.num_rows, pa.int64())
    for column in batch.columns:
        total = pc.add(total, _value_sizes(column))
    return [int(size) for size in total.to_pylist()]


def _value_sizes(array: pa.Array) -> pa.Array:
    kind = array.type
    if pa.types.is_dictionary(kind):
        sizes = pc.take(_value_sizes(array.dictionary), array.indices)
    elif (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        sizes = pc.binary_length(array)
    elif pa.types.is_struct(kind):
        sizes = pa.array([0] * len(array), pa.int64())
        for child in array.flatten():
            sizes = pc.add(sizes, _value_sizes(child))
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        # Sum each list's element sizes: differences of the running total at the list offsets.
        running = pc.cumulative_sum(_value_sizes(array.values).cast(pa.int64()))
        running = pa.concat_arrays([pa.array([0], pa.int64()), running])
        offsets = array.offsets
        sizes = pc.subtract(
            pc.take(running, offsets.slice(1)), pc.take(running, offsets.slice(0, len(array)))
        )
    else:
        sizes = pa.array([8] * len(array), pa.int64())
    return pc.fill_null(sizes.cast(pa.int64()), 0)
