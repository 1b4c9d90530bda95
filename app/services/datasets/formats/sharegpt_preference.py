"""LLaMA-Factory's ShareGPT-style preference rows: `{"conversations": [{"from", "value"}, ...],
"chosen": {"from": "gpt", "value"}, "rejected": {"from": "gpt", "value"}, "system"?}`; the
conversation is the prompt and ends with the human turn both answers reply to."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.base import Normalized
from app.services.datasets.formats.pairs import PreferenceFormat, side
from app.services.datasets.formats.sharegpt import sharegpt_messages


class ShareGPTPreference(PreferenceFormat):
    name = "sharegpt_preference"
    title = "ShareGPT preference"
    shape = '{"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": ...}'
    fields = ("conversations", "system", "chosen", "rejected")
    required = ("conversations", "chosen", "rejected")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        column = self.columns["conversations"]
        prompt = sharegpt_messages(record, column, self.columns["system"], line, errors)
        chosen = side(record, self.columns["chosen"], line, errors)
        rejected = side(record, self.columns["rejected"], line, errors)
        return self.pair(line, prompt, chosen, rejected, errors, column)
