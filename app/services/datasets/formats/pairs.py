"""What the preference formats share: a pair's checks and the parsing of an answer ("side").

A normalised pair is `{"line": N, "prompt": [messages], "chosen": [assistant messages],
"rejected": [assistant messages]}`: the prompt may hold a system message and earlier turns and
ends with a user turn; each side holds the assistant turn(s) that answer it.
"""

from __future__ import annotations

from typing import Any

from app.dataset_errors import RowError, describe_type
from app.services.datasets.formats.base import PREFERENCE_METHODS, DatasetFormat, Normalized
from app.services.datasets.formats.openai_chat import openai_turn
from app.services.datasets.formats.sharegpt import sharegpt_turn

Messages = list[dict[str, str]]
SIDE_SHAPE = 'a string, a message {"role": "assistant", "content": ...} or a list of them'


class PreferenceFormat(DatasetFormat):
    """A format whose rows pair a chosen and a rejected answer to one prompt."""

    methods = PREFERENCE_METHODS

    def pair(
        self,
        line: int,
        prompt: Messages,
        chosen: Messages | None,
        rejected: Messages | None,
        errors: list[RowError],
        prompt_field: str,
    ) -> Normalized:
        """The normalised pair, after the checks every preference row needs."""
        if not errors:
            check_prompt(prompt, prompt_field, line, errors)
        if not errors and chosen == rejected:
            errors.append(
                RowError(
                    line,
                    self.columns["rejected"],
                    "identical_answers",
                    "the rejected answer is the same as the chosen one, so there is nothing "
                    "to prefer",
                    "Fix or drop this pair: a preference pair needs two different answers.",
                )
            )
        if errors:
            return None, errors
        return {"line": line, "prompt": prompt, "chosen": chosen, "rejected": rejected}, errors


def check_prompt(prompt: Messages, field: str, line: int, errors: list[RowError]) -> None:
    if not any(m["role"] == "user" for m in prompt):
        errors.append(
            RowError(line, field, "empty_prompt", "the prompt is empty; expected the question")
        )
    elif prompt[-1]["role"] != "user":
        errors.append(
            RowError(
                line,
                field,
                "prompt_not_ending_in_user_turn",
                f"the prompt ends with a {prompt[-1]['role']} turn; it must end with the user "
                "turn that the two answers reply to",
                "Move the last assistant turn into the answers, or drop this pair.",
            )
        )


def side(record: dict[str, Any], column: str, line: int, errors: list[RowError]) -> Messages | None:
    """One answer of a pair as assistant messages: a string, a message (OpenAI or ShareGPT keys)
    or a list of messages. None, with its problems in `errors`, when it is not one."""
    if column not in record:
        errors.append(
            RowError(line, column, "missing_field", f"missing; expected the answer: {SIDE_SHAPE}")
        )
        return None
    value = record[column]
    messages: Messages = []
    problems: list[RowError] = []
    if isinstance(value, str):
        if not value.strip():
            errors.append(RowError(line, column, "empty_value", "the answer is empty"))
            return None
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        message_turn(value, column, line, problems, messages)
    elif isinstance(value, list | tuple) and value:
        for index, turn in enumerate(value):
            message_turn(turn, f"{column}[{index}]", line, problems, messages)
    elif isinstance(value, list | tuple):
        problems.append(RowError(line, column, "empty_value", "the answer has no turns"))
    else:
        problems.append(
            RowError(
                line, column, "wrong_type", f"expected {SIDE_SHAPE}, found {describe_type(value)}"
            )
        )
    if not problems:
        for message in messages:
            if message["role"] != "assistant":
                problems.append(
                    RowError(
                        line,
                        column,
                        "not_an_answer",
                        f"an answer holds assistant turns only, found a {message['role']} turn",
                        "Put the conversation before the answer in the prompt.",
                    )
                )
                break
        if not messages:
            problems.append(RowError(line, column, "empty_value", "the answer is empty"))
    errors.extend(problems)
    return None if problems else messages


def message_turn(
    turn: Any, path: str, line: int, errors: list[RowError], messages: Messages
) -> None:
    """One message with OpenAI's keys (`role`, `content`) or ShareGPT's (`from`, `value`)."""
    if isinstance(turn, dict) and ("from" in turn or "value" in turn):
        sharegpt_turn(turn, path, line, errors, messages)
    else:
        openai_turn(turn, path, line, errors, messages)


def prompt_messages(
    record: dict[str, Any], column: str, line: int, errors: list[RowError]
) -> Messages:
    """A prompt column: a string (one user turn) or a list of messages."""
    if column not in record:
        errors.append(
            RowError(
                line,
                column,
                "missing_field",
                "missing; expected the prompt: a string or a list of messages",
            )
        )
        return []
    value = record[column]
    if isinstance(value, str):
        if not value.strip():
            errors.append(RowError(line, column, "empty_prompt", "the prompt is empty"))
            return []
        return [{"role": "user", "content": value}]
    messages: Messages = []
    if isinstance(value, list | tuple):
        for index, turn in enumerate(value):
            message_turn(turn, f"{column}[{index}]", line, errors, messages)
        return messages
    errors.append(
        RowError(
            line,
            column,
            "wrong_type",
            f"expected the prompt as a string or a list of messages, found {describe_type(value)}",
        )
    )
    return []
