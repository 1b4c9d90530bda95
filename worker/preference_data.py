"""Preference pairs as token ids: the one way the token report and preference training tokenise
a normalised pair `{"line", "prompt": [messages], "chosen": [messages], "rejected": [messages]}`.

The prompt is the chat template's rendering of the prompt turns with the generation prompt; each
answer is the rest of the rendering of the prompt turns plus that answer, so the template's
end-of-turn tokens belong to the answer (and are trained), and the separator a template writes
after them does not. Prompt and answers are tokenised separately, without special tokens (the
template writes its own BOS), as TRL does.

Truncation (`PAIR_TRUNCATION_RULE`): the prompt is kept whole unless `max_prompt_len` is given
(then it is cut from the left, keeping the question next to the answers); the answers are cut
from the right so that prompt + answer fits `max_seq_len`. A pair left with no answer token on
either side is dropped (`tokenize_pair` returns None) and counted by the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.data import template_of

PAIR_TRUNCATION_RULE = (
    "Pairs longer than the max length keep their prompt whole and have both answers cut at the "
    "end to fit; a pair left with no token of its chosen or rejected answer after the cut is "
    "dropped."
)


@dataclass
class TokenizedPair:
    """One preference pair as token ids: the prompt and each answer after it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False  # an answer (or, with max_prompt_len, the prompt) was cut to fit
    line: int | None = None
    dataset: str | None = None  # the dataset it came from, in a job of several (worker/mix.py)

    def __len__(self) -> int:  # its tokens in a training batch: the prompt goes in twice
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def tokenize_pair(
    tokenizer: Any,
    row: dict[str, Any],
    max_seq_len: int,
    chat_template: str | None = None,
    *,
    max_prompt_len: int | None = None,
) -> TokenizedPair | None:
    """`(prompt_ids, chosen_ids, rejected_ids)` of a normalised pair, cut to `max_seq_len`
    (prompt + each answer), or None when an answer has no token left after the cut.
    Raises ChatTemplateMissing for a tokenizer without a chat template (unless given one)."""
    template = template_of(tokenizer, chat_template)
    prompt_text = _render(tokenizer, row["prompt"], template, generation_prompt=True)
    prompt_ids = _encode(tokenizer, prompt_text)
    answers = [
        _encode(tokenizer, _answer_text(tokenizer, row["prompt"], row[side], template, prompt_text))
        for side in ("chosen", "rejected")
    ]
    whole = len(prompt_ids) + sum(map(len, answers))
    if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_len :] if max_prompt_len else []
    room = max_seq_len - len(prompt_ids)
    chosen_ids, rejected_ids = (answer[: max(room, 0)] for answer in answers)
    if not chosen_ids or not rejected_ids:
        return None
    cut = len(prompt_ids) + len(chosen_ids) + len(rejected_ids) < whole
    return TokenizedPair(
        prompt_ids, chosen_ids, rejected_ids, cut, row.get("line"), row.get("dataset")
    )


def answer_texts(
    tokenizer: Any, row: dict[str, Any], chat_template: str | None = None
) -> tuple[str, str, str]:
    """The pair as text: the rendered prompt and each answer's rendering after it."""
    template = template_of(tokenizer, chat_template)
    prompt_text = _render(tokenizer, row["prompt"], template, generation_prompt=True)
    chosen, rejected = (
        _answer_text(tokenizer, row["prompt"], row[side], template, prompt_text)
        for side in ("chosen", "rejected")
    )
    return prompt_text, chosen, rejected


def _answer_text(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: list[dict[str, str]],
    template: str,
    prompt_text: str,
) -> str:
    full = _render(tokenizer, [*prompt, *answer], template, generation_prompt=False)
    start = 0
    while start < min(len(full), len(prompt_text)) and full[start] == prompt_text[start]:
        start += 1
    text = full[start:]
    # The separator a template writes after the end-of-turn token is not part of the answer.
    return text.rstrip() if text.strip() else text


def _render(
    tokenizer: Any, messages: list[dict[str, str]], template: str, *, generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
