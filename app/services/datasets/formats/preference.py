"""Preference pairs as TRL writes them: `{"prompt", "chosen", "rejected"}`, each a string, or in
conversational form a list of messages (the prompt's turns; the answer's assistant turn(s))."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.base import Normalized
from app.services.datasets.formats.pairs import PreferenceFormat, prompt_messages, side


class Preference(PreferenceFormat):
    name = "preference"
    title = "preference (prompt/chosen/rejected)"
    shape = '{"prompt", "chosen", "rejected"}'
    fields = ("prompt", "chosen", "rejected")
    required = ("prompt", "chosen", "rejected")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        prompt = prompt_messages(record, self.columns["prompt"], line, errors)
        chosen = side(record, self.columns["chosen"], line, errors)
        rejected = side(record, self.columns["rejected"], line, errors)
        return self.pair(line, prompt, chosen, rejected, errors, self.columns["prompt"])
