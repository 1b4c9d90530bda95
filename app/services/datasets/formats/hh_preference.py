"""Preference pairs as whole transcripts, Anthropic HH-style: `{"chosen": "\\n\\nHuman: ...
\\n\\nAssistant: ...", "rejected": "..."}` (or each a list of messages, TRL's "implicit prompt").
The turns both transcripts share are the prompt; what follows in each is its answer."""

from __future__ import annotations

import re
from typing import Any

from app.dataset_errors import RowError, describe_type
from app.services.datasets.formats.base import Normalized
from app.services.datasets.formats.pairs import Messages, PreferenceFormat, message_turn

# A turn starts at the text's start or after a blank line: "\n\nHuman: " / "\n\nAssistant: ".
TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):[ ]?")
ROLES = {"Human": "user", "Assistant": "assistant"}
TRANSCRIPT_SHAPE = '"\\n\\nHuman: ...\\n\\nAssistant: ..."'


class HHPreference(PreferenceFormat):
    name = "hh_preference"
    title = "preference transcripts (Anthropic HH)"
    shape = '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}'
    fields = ("chosen", "rejected")
    required = ("chosen", "rejected")

    def normalize(self, line: int, record: dict[str, Any]) -> Normalized:
        errors: list[RowError] = []
        chosen = transcript(record, self.columns["chosen"], line, errors)
        rejected = transcript(record, self.columns["rejected"], line, errors)
        if errors or chosen is None or rejected is None:
            return None, errors
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # The prompt ends with the last user turn both share; both answers follow it.
        while shared and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
        prompt, chosen_answer, rejected_answer = chosen[:shared], chosen[shared:], rejected[shared:]
        for column, answer in (
            (self.columns["chosen"], chosen_answer),
            (self.columns["rejected"], rejected_answer),
        ):
            if not answer or any(m["role"] != "assistant" for m in answer):
                errors.append(
                    RowError(
                        line,
                        column,
                        "no_shared_prompt",
                        "the two transcripts do not share a prompt followed by one answer each: "
                        "they differ before their last Human turn, or this one has no Assistant "
                        "answer",
                        "Both transcripts must be the same conversation up to the last Human "
                        "turn; map a separate prompt column if you have one "
                        '({"prompt": ..., "chosen": ..., "rejected": ...}).',
                    )
                )
                break
        return self.pair(
            line, prompt, chosen_answer, rejected_answer, errors, self.columns["chosen"]
        )


def transcript(
    record: dict[str, Any], column: str, line: int, errors: list[RowError]
) -> Messages | None:
    """A whole conversation: a Human/Assistant transcript string or a list of messages."""
    if column not in record:
        errors.append(
            RowError(
                line, column, "missing_field", f"missing; expected a transcript {TRANSCRIPT_SHAPE}"
            )
        )
        return None
    value = record[column]
    problems: list[RowError] = []
    messages: Messages = []
    if isinstance(value, list | tuple) and value:
        for index, turn in enumerate(value):
            message_turn(turn, f"{column}[{index}]", line, problems, messages)
    elif isinstance(value, str) and value.strip():
        marks = list(TURN.finditer(value))
        if not marks or value[: marks[0].start()].strip():
            problems.append(
                RowError(
                    line,
                    column,
                    "not_a_transcript",
                    f"expected a transcript {TRANSCRIPT_SHAPE}, found text that does not start "
                    'with a "Human:" turn',
                    'For a separate prompt column, map it: {"prompt": "<column>"}.',
                )
            )
        for index, mark in enumerate(marks):
            end = marks[index + 1].start() if index + 1 < len(marks) else len(value)
            messages.append({"role": ROLES[mark.group(1)], "content": value[mark.end() : end]})
    elif isinstance(value, str | list | tuple):
        problems.append(RowError(line, column, "empty_value", "the transcript is empty"))
    else:
        problems.append(
            RowError(
                line,
                column,
                "wrong_type",
                f"expected a transcript {TRANSCRIPT_SHAPE} or a list of messages, "
                f"found {describe_type(value)}",
            )
        )
    for message in messages:
        if not problems and not message["content"].strip():
            problems.append(
                RowError(line, column, "empty_value", f"a {message['role']} turn is empty")
            )
    errors.extend(problems)
    return None if problems else messages
