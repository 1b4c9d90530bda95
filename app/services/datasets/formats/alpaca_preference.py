"""LLaMA-Factory's Alpaca-style preference rows: `{"instruction", "input" (optional), "system"
(optional), "chosen", "rejected"}`; the prompt is instruction + input, as for Alpaca."""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError
from app.services.datasets.formats.alpaca import alpaca_prompt
from app.services.datasets.formats.base import Normalized
from app.services.datasets.formats.pairs import PreferenceFormat, side
from app.services.datasets.formats.sharegpt import system_message


class AlpacaPreference(PreferenceFormat):
    name = "alpaca_preference"
    title = "Alpaca preference"
    shape = '{"instruction", "input" (optional), "chosen", "rejected"}'
    fields = ("instruction", "input", "system", "chosen", "rejected")
    required = ("instruction", "chosen", "rejected")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        prompt = system_message(record, self.columns["system"], line, errors)
        user = alpaca_prompt(record, self.columns, line, errors)
        prompt.append({"role": "user", "content": user})
        chosen = side(record, self.columns["chosen"], line, errors)
        rejected = side(record, self.columns["rejected"], line, errors)
        return self.pair(line, prompt, chosen, rejected, errors, self.columns["instruction"])
