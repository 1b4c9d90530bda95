"""The dataset formats Tuneboard reads, one class a file, registered in `FORMATS`; and how a file's
format is found: from a column mapping, else by the columns of the first rows.

To add a format: write a `DatasetFormat` subclass in a new file here and add it to `FORMATS`.
Detection tries the classes in list order for each row (so a more specific shape goes before one
whose columns it contains), most rows decide, and a tie goes to the format listed first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from app.dataset_errors import DatasetFormatError, describe_type
from app.services.datasets.formats.alpaca import Alpaca
from app.services.datasets.formats.alpaca_preference import AlpacaPreference
from app.services.datasets.formats.base import SFT_METHODS, DatasetFormat
from app.services.datasets.formats.hh_preference import HHPreference
from app.services.datasets.formats.openai_chat import OpenAIChat
from app.services.datasets.formats.preference import Preference
from app.services.datasets.formats.prompt_completion import PromptCompletion
from app.services.datasets.formats.sharegpt import ShareGPT
from app.services.datasets.formats.sharegpt_preference import ShareGPTPreference
from app.services.datasets.formats.text import PlainText

# Preference shapes first: their rows also carry the columns of an SFT shape ("conversations").
FORMATS: list[type[DatasetFormat]] = [
    Preference,
    AlpacaPreference,
    ShareGPTPreference,
    HHPreference,
    OpenAIChat,
    ShareGPT,
    Alpaca,
    PromptCompletion,
    PlainText,
]

BY_NAME = {cls.name: cls for cls in FORMATS}
# Every field any format has, once, in registry order: the upload form's column-mapping inputs.
MAPPABLE_FIELDS = tuple(dict.fromkeys(field for cls in FORMATS for field in cls.fields))

# Columns that carry media beside the text (LLaMA-Factory's mllm_demo.json, ShareGPT/OpenAI
# multimodal exports), with the placeholder each leaves in the text.
MEDIA_COLUMNS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}

__all__ = [
    "BY_NAME",
    "FORMATS",
    "MAPPABLE_FIELDS",
    "DatasetFormat",
    "detect_format",
    "format_title",
    "methods_of",
]


def format_title(name: str) -> str:
    """A stored format name in the user's words ("OpenAI chat"); unknown names as they are."""
    cls = BY_NAME.get(name)
    return cls.title if cls is not None else name


def methods_of(name: str) -> tuple[str, ...]:
    """The training methods a dataset of this format suits."""
    cls = BY_NAME.get(name)
    return cls.methods if cls is not None else SFT_METHODS


def shapes() -> str:
    return "; ".join(f"{cls.title} {cls.shape}" for cls in FORMATS)


def detect_format(
    records: Iterable[dict[str, Any]], column_mapping: dict[str, str] | None = None
) -> DatasetFormat:
    """The format of a sample of rows (the first few of the file), or DatasetFormatError.

    A column mapping (format field -> column in the file) narrows detection to the formats that
    have every mapped field, and every mapped column must occur in the sample.
    """
    records = list(records)
    columns_seen: dict[str, None] = {}  # ordered set, for messages that list the file's columns
    for record in records:
        columns_seen.update(dict.fromkeys(record))
    found = ", ".join(f'"{c}"' for c in columns_seen) or "none"
    _refuse_multimodal(records)

    if column_mapping:
        dataset_format = _format_from_mapping(column_mapping, set(columns_seen))
    else:
        dataset_format = _format_from_columns(records, found)

    for field, column in dataset_format.columns.items():
        if column in columns_seen or field not in dataset_format.required:
            continue
        if column_mapping and field in column_mapping:
            message = f'Column "{column}" (mapped to "{field}") is not in the file'
        else:
            message = f'Column "{column}" is not in the file'
        raise DatasetFormatError(
            f"{message}; columns found: {found}",
            field=column,
            hint=f'Map the field to one of your columns, e.g. {{"{field}": "<column name>"}}.',
        )
    for field, column in (column_mapping or {}).items():
        if column not in columns_seen:
            raise DatasetFormatError(
                f'Column "{column}" (mapped to "{field}") is not in the file; '
                f"columns found: {found}",
                field=column,
                hint="Check the spelling: column names are case-sensitive.",
            )
    return dataset_format


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


def _format_from_mapping(column_mapping: dict[str, str], columns_seen: set[str]) -> DatasetFormat:
    """The format the mapping's fields name. A field may belong to several formats ("prompt"):
    then the first of them whose required columns the file has (mapped or by name) wins."""
    for field, column in column_mapping.items():
        if field not in MAPPABLE_FIELDS:
            known = ", ".join(f'"{f}"' for f in MAPPABLE_FIELDS)
            raise DatasetFormatError(
                f'Unknown field "{field}" in the column mapping; known fields: {known}',
                field=field,
                hint='A mapping reads {"<field>": "<your column>"}, e.g. {"prompt": "question"}.',
            )
        if not isinstance(column, str) or not column:
            raise DatasetFormatError(
                f'The column mapping for "{field}" must be a column name, '
                f"found {describe_type(column)}",
                field=field,
            )
    candidates = [cls for cls in FORMATS if set(column_mapping) <= set(cls.fields)]
    if not candidates:
        owners = {next(c.title for c in FORMATS if field in c.fields) for field in column_mapping}
        names = " and ".join(sorted(owners))
        raise DatasetFormatError(
            f"The column mapping mixes fields of {names}; map the fields of one format only",
            hint=f"Formats and their fields: {shapes()}.",
        )
    for cls in candidates:
        dataset_format = cls(column_mapping)
        if all(dataset_format.columns[field] in columns_seen for field in cls.required):
            return dataset_format
    return candidates[0](column_mapping)


def _format_from_columns(records: list[dict[str, Any]], found: str) -> DatasetFormat:
    votes: Counter[type[DatasetFormat]] = Counter()
    for record in records:
        keys = set(record)
        cls = next((cls for cls in FORMATS if cls.recognises(keys)), None)
        if cls is not None:
            votes[cls] += 1
    if not votes:
        raise DatasetFormatError(
            f"Could not recognise the dataset format from its columns ({found}); expected one of: "
            f"{shapes()}",
            hint='Rename the columns, or give a column mapping such as {"prompt": "question", '
            '"completion": "answer"}.',
        )
    # Most rows decide; a tie goes to the format listed first.
    cls = max(votes, key=lambda c: (votes[c], -FORMATS.index(c)))
    return cls()
