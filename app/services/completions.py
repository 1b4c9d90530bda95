"""OpenAI's legacy completions (`POST /v1/completions`) on a worker's inference server.

Each prompt of a request is one `/complete` on the worker (app/generation.py's
CompletionRequest; worker/completion.py runs it) and one choice of the answer, in order. The
worker sends token events (`{"token", "logprob", "top", "prompt"}`); this module turns them into
the legacy `text_completion` shapes: the choice's text and its `logprobs` object (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`, the offsets into the choice's text), whole or
as SSE chunks. lm-evaluation-harness's `local-completions` scores answers from these.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.db import Database
from app.errors import UserError
from app.generation import CompletionRequest
from app.services import inference_client as inference
from app.settings import Settings

Prompt = str | list[int]


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """The prompts one request holds: a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [[int(p) for p in prompt]]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise UserError(
            "prompt is empty.",
            "Send a text, a list of texts, a list of token ids or a list of such lists.",
            code="invalid_prompt",
        )
    for number, one in enumerate(prompts):
        if not one:
            where = "prompt" if len(prompts) == 1 else f"prompt[{number}]"
            raise UserError(
                f"{where} is empty.",
                "Send some text or at least one token id: an empty prompt has nothing to continue.",
                code="invalid_prompt",
            )
    return prompts


def completion_requests(prompts: Sequence[Prompt], **fields: Any) -> list[CompletionRequest]:
    """One worker request per prompt (a UserError naming the field when a setting is invalid)."""
    if fields.get("max_new_tokens") == 0 and not fields.get("echo"):
        raise UserError(
            "max_tokens is 0 and echo is off: the answer would be empty.",
            "Set max_tokens to 1 or more, or echo to true to get the prompt (and its logprobs).",
            code="invalid_max_tokens",
        )
    return [inference.worker_request(CompletionRequest, prompt=p, **fields) for p in prompts]


@dataclass
class Choice:
    """One prompt's answer as it arrives: its text and, when asked, its logprobs object."""

    index: int
    scored: bool
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        """Take one token event; its part of the answer (text and logprobs)."""
        piece, offset = str(event.get("token", "")), len(self.text)
        self.text += piece
        part: dict[str, Any] = {"text": piece, "logprobs": None}
        if self.scored:
            entry = (piece, event.get("logprob"), event.get("top"), offset)
            for column, value in zip(self._columns(), entry, strict=True):
                column.append(value)
            part["logprobs"] = {
                "tokens": [piece],
                "token_logprobs": [entry[1]],
                "top_logprobs": [entry[2]],
                "text_offset": [offset],
            }
        return part

    def _columns(self) -> tuple[list[Any], ...]:
        return (self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset)

    def logprobs(self) -> dict[str, Any] | None:
        if not self.scored:
            return None
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _finish_reason(summary: dict[str, Any]) -> str:
    return inference.FINISH_REASONS.get(str(summary.get("finish_reason")), "stop")


class Completions:
    """One /v1/completions request: its prompts run one after another on the serving worker.
    `await start()` opens the first, so that errors the worker answers before streaming (unknown
    model, a prompt too long) get their status code; then `answer()` or `stream()`."""

    def __init__(
        self, db: Database, settings: Settings, model: str, requests: list[CompletionRequest]
    ) -> None:
        self.db, self.settings, self.model, self.requests = db, settings, model, requests
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._first: inference.Generation | None = None

    async def start(self) -> None:
        self._first = await self._open(self.requests[0])

    async def _open(self, request: CompletionRequest) -> inference.Generation:
        generation = inference.open_generation(self.db, self.settings, request)
        await generation.start()
        return generation

    async def _runs(self) -> AsyncIterator[tuple[int, inference.Generation]]:
        for index, request in enumerate(self.requests):
            if index == 0 and self._first is not None:
                generation = self._first
            else:
                generation = await self._open(request)
            try:
                yield index, generation
            finally:
                await generation.aclose()

    async def aclose(self) -> None:
        if self._first is not None:
            await self._first.aclose()

    def _body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    async def answer(self) -> dict[str, Any]:
        """The whole answer: a choice per prompt, and the usage of all of them."""
        choices, summaries = [], []
        async for index, generation in self._runs():
            choice = Choice(index, self.requests[index].logprobs is not None)
            async for event in generation.token_events():
                choice.add(event)
            summaries.append(generation.summary)
            choices.append(
                {
                    "text": choice.text,
                    "index": index,
                    "logprobs": choice.logprobs(),
                    "finish_reason": _finish_reason(generation.summary),
                }
            )
        return {**self._body(choices), "usage": inference.token_usage(summaries)}

    async def stream(self, *, include_usage: bool = False) -> AsyncIterator[str]:
        """SSE `data:` lines in OpenAI's legacy stream form: a chunk per token (a choice with
        its `text` piece and logprobs), a closing chunk per prompt with its finish_reason, then
        `data: [DONE]`. An error after the stream began comes as a `data:` error line. With
        `include_usage` (`stream_options`), every chunk says `usage: null` and one more, with no
        choices, brings the usage of all the prompts right before `[DONE]`, as OpenAI's does."""

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body = self._body(choices)
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        summaries = []
        try:
            async for index, generation in self._runs():
                choice = Choice(index, self.requests[index].logprobs is not None)
                async for event in generation.token_events():
                    part = choice.add(event)
                    yield chunk([{**part, "index": index, "finish_reason": None}])
                summaries.append(generation.summary)
                reason = _finish_reason(generation.summary)
                yield chunk(
                    [{"text": "", "index": index, "logprobs": None, "finish_reason": reason}]
                )
        except UserError as exc:
            yield f"data: {json.dumps(inference.openai_error(exc))}\n\n"
            return
        if include_usage:
            yield chunk([], inference.token_usage(summaries))
        yield "data: [DONE]\n\n"
