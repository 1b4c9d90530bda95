"""Plain text: `{"text"}`, for continued pre-training (every token is trained)."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.base import DatasetFormat, Normalized, text_field


class PlainText(DatasetFormat):
    name = "text"
    title = "plain text"
    shape = '{"text"}'
    fields = ("text",)
    required = ("text",)

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        text = text_field(record, self.columns["text"], line, errors)
        return ({"line": line, "text": text} if not errors else None), errors
