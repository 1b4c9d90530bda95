"""Alpaca: `{"instruction", "input" (optional), "output"}`; the prompt is instruction + input."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.base import DatasetFormat, Normalized, text_field


class Alpaca(DatasetFormat):
    name = "alpaca"
    title = "Alpaca"
    shape = '{"instruction", "input" (optional), "output"}'
    fields = ("instruction", "input", "output")
    required = ("instruction", "output")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        user = alpaca_prompt(record, self.columns, line, errors)
        output = text_field(record, self.columns["output"], line, errors)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return ({"line": line, "messages": messages} if not errors else None), errors


def alpaca_prompt(
    record: dict[str, Any], columns: dict[str, str], line: int, errors: list[RowError]
) -> str:
    """The user turn of an Alpaca-style row: the instruction, then the input when there is one."""
    instruction = text_field(record, columns["instruction"], line, errors)
    extra = text_field(record, columns["input"], line, errors, required=False)
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
