"""Prompt/completion: `{"prompt", "completion"}`, one user turn and one reply."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.base import DatasetFormat, Normalized, text_field


class PromptCompletion(DatasetFormat):
    name = "prompt_completion"
    title = "prompt/completion"
    shape = '{"prompt", "completion"}'
    fields = ("prompt", "completion")
    required = ("prompt", "completion")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        prompt = text_field(record, self.columns["prompt"], line, errors)
        completion = text_field(record, self.columns["completion"], line, errors)
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return ({"line": line, "messages": messages} if not errors else None), errors
