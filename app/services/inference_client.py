"""The web side of generation: find a worker's inference server, stream from it, speak OpenAI.

The worker's server (`worker/inference.py`) streams `data: {"token": ...}` lines and a final
`data: {"done": true, ...}`; this module turns them into OpenAI chat-completion chunks. Closing a
`Generation` closes the upstream connection, which stops the generation on the GPU. With `tools`,
the answer's calls are read from its text (app/tool_calls.py) and returned as `tool_calls`; the
stream then sends the answer whole at its end, once it is known to be a call or text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from sqlmodel import col, select

from app.db import Database
from app.errors import NotFound, UserError
from app.generation import CompletionRequest, GenerationRequest
from app.models import Adapter, BaseModelEntry, Worker
from app.settings import Settings
from app.tool_calls import parse_tool_calls, template_message

Request = TypeVar("Request", bound=BaseModel)

CONNECT_TIMEOUT_SECONDS = 5.0
# A model load (first request after a start) can take minutes on a large model.
FIRST_BYTE_TIMEOUT_SECONDS = 600.0


class InferenceUnavailable(UserError):
    status_code = 503
    code = "no_inference_worker"


@dataclass(frozen=True)
class InferenceServer:
    """Where a worker's inference server listens, and the secret it lets the web server in by."""

    url: str
    secret: str


def serving_worker(db: Database, settings: Settings) -> Worker | None:
    """The live worker with an inference server that heartbeated last: the one chats go to."""
    alive_since = datetime.now(UTC) - timedelta(seconds=settings.lease_seconds)
    with db.read() as s:
        return s.exec(
            select(Worker)
            .where(col(Worker.inference_url).is_not(None))
            .where(Worker.stopped == False)  # noqa: E712
            .where(Worker.heartbeat_at >= alive_since)
            .order_by(col(Worker.heartbeat_at).desc())
        ).first()


def find_inference_server(db: Database, settings: Settings) -> InferenceServer:
    """The inference server of the live worker that heartbeated last."""
    worker = serving_worker(db, settings)
    if worker is None or not worker.inference_url or not worker.inference_secret:
        raise InferenceUnavailable(
            "No worker is serving the playground right now.",
            "Start one with `tuneboard serve` (or `tuneboard worker`); chat needs a running "
            "worker.",
        )
    return InferenceServer(worker.inference_url, worker.inference_secret)


@dataclass
class ModelChoice:
    """What a `model` name means: a base model alone, or an adapter on its base."""

    name: str
    base_model: str
    adapter: Adapter | None = None


def resolve_model(db: Database, name: str) -> ModelChoice:
    with db.read() as s:
        adapter = s.get(Adapter, name)
        if adapter is not None:
            return ModelChoice(name, adapter.base_model, adapter)
        if s.get(BaseModelEntry, name) is not None:
            return ModelChoice(name, name)
    raise NotFound(
        f"There is no base model or adapter named {name!r}.",
        "GET /v1/models lists the names you can use as `model`.",
        code="model_not_found",
    )


def list_choices(db: Database) -> tuple[list[BaseModelEntry], list[Adapter]]:
    with db.read() as s:
        bases = list(s.exec(select(BaseModelEntry).order_by(col(BaseModelEntry.created_at))))
        adapters = list(s.exec(select(Adapter).order_by(col(Adapter.created_at).desc())))
    return bases, adapters


def check_tools(
    db: Database,
    choice: ModelChoice,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
) -> set[str] | None:
    """The names of the request's tools (None when it has none), or a 400 when it brings tools,
    tool results or calls to a model whose chat template cannot render them."""
    uses_tools = bool(tools) or any(
        m.get("role") == "tool" or m.get("tool_calls") for m in messages
    )
    if not uses_tools:
        return None
    with db.read() as s:
        base = s.get(BaseModelEntry, choice.base_model)
        takes_tools = base is not None and base.supports_tools
        others = [
            m.name
            for m in s.exec(select(BaseModelEntry).order_by(col(BaseModelEntry.created_at)))
            if m.supports_tools
        ]
    if not takes_tools:
        raise UserError(
            f"The chat template of {choice.base_model} has no tool support, so {choice.name} "
            "cannot take `tools`, `tool` messages or tool calls.",
            (
                f"Use a model whose chat template takes tools ({', '.join(others)}), or "
                if others
                else "Register a model whose chat template takes tools, or "
            )
            + "send the conversation without tools.",
            code="tools_unsupported",
            status_code=400,
        )
    return {t["function"]["name"] for t in tools or []}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI request messages as chat templates take them: a `developer` message is the system
    prompt, calls' arguments are objects."""
    out = []
    for message in messages:
        message = template_message(message)
        if message["role"] == "developer":
            message["role"] = "system"
        out.append(message)
    return out


def generation_request(**fields: Any) -> GenerationRequest:
    """The chat request to post to a worker (app/generation.py); a UserError when it is not one."""
    return worker_request(GenerationRequest, **fields)


def worker_request(kind: type[Request], **fields: Any) -> Request:
    """A request to post to a worker (app/generation.py); a UserError when it is not one."""
    try:
        return kind(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(
            f"Field {where}: {first['msg']}", "Fix the request and send it again.", code="invalid"
        ) from exc


class Generation:
    """One streamed generation on a worker: a chat (`/generate`) or a raw-prompt completion
    (`/complete`, `params` a CompletionRequest). `await start()` first: it raises a UserError for
    errors the worker answers before streaming (unknown model, GPU busy), so a route can still
    answer with the right status code. Always `await aclose()`."""

    def __init__(
        self, server: InferenceServer, params: GenerationRequest | CompletionRequest
    ) -> None:
        self.url = server.url.rstrip("/")
        self.params = params
        self.path = "/complete" if isinstance(params, CompletionRequest) else "/generate"
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {server.secret}"},
            timeout=httpx.Timeout(FIRST_BYTE_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
        )
        self._response: httpx.Response | None = None
        self.summary: dict[str, Any] = {}
        self.text = ""

    async def start(self) -> None:
        request = self._client.build_request(
            "POST", f"{self.url}{self.path}", json=self.params.model_dump()
        )
        try:
            self._response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self.aclose()
            raise InferenceUnavailable(
                f"The worker's inference server at {self.url} did not answer ({type(exc).__name__}).",
                "Check that the worker is running (System page); it restarts the server on start.",
            ) from exc
        if self._response.status_code != 200:
            body = await self._response.aread()
            await self.aclose()
            raise _error_from(self._response.status_code, body)

    async def events(self) -> AsyncIterator[str]:
        """The generated text, piece by piece; `summary` holds the worker's final report."""
        async for event in self.token_events():
            token = str(event.get("token", ""))
            self.text += token
            yield token

    async def token_events(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's token events (`{"token": ...}`, and for a completion its log-probs);
        `summary` holds the worker's final report."""
        assert self._response is not None, "call start() first"
        async for line in self._response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:].strip())
            if "error" in event:
                error = event["error"]
                raise UserError(
                    str(error.get("message", "Generation failed.")),
                    str(error.get("hint", "")),
                    code=str(error.get("code", "generation_failed")),
                    status_code=502,
                )
            if event.get("done"):
                self.summary = event
                return
            yield event
        raise UserError(
            "The worker's inference server closed the stream early.",
            "Look at the worker's log; a restarted worker serves the next request.",
            code="stream_interrupted",
            status_code=502,
        )

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        await self._client.aclose()


def _error_from(status: int, body: bytes) -> UserError:
    try:
        error = json.loads(body)["error"]
        return UserError(
            str(error["message"]),
            str(error.get("hint", "")),
            code=str(error["code"]),
            status_code=status,
        )
    except (ValueError, KeyError, TypeError):
        return UserError(
            f"The worker's inference server answered {status}.",
            "Look at the worker's log.",
            code="inference_failed",
            status_code=502 if status < 500 else status,
        )


def open_generation(
    db: Database, settings: Settings, params: GenerationRequest | CompletionRequest
) -> Generation:
    return Generation(find_inference_server(db, settings), params)


# --- OpenAI shapes -----------------------------------------------------------------------------


FINISH_REASONS = {"stop": "stop", "length": "length"}


def _answer(generation: Generation, tool_names: set[str] | None) -> tuple[dict[str, Any], str]:
    """The finished answer as OpenAI's message and finish reason: its tool calls, when the
    request had tools and the model made some."""
    reason = FINISH_REASONS.get(str(generation.summary.get("finish_reason")), "stop")
    if tool_names is not None:
        content, calls = parse_tool_calls(generation.text, tool_names)
        if calls:
            return {"role": "assistant", "content": content or None, "tool_calls": calls}, (
                "tool_calls"
            )
    return {"role": "assistant", "content": generation.text}, reason


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def token_usage(summaries: Sequence[dict[str, Any]]) -> dict[str, int]:
    """OpenAI's `usage`: the tokens of the worker's summaries (one per generation), added up."""
    prompt = sum(int(s.get("prompt_tokens", 0)) for s in summaries)
    completion = sum(int(s.get("completion_tokens", 0)) for s in summaries)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass(frozen=True)
class ChatChunks:
    """The `chat.completion.chunk` lines of one streamed answer. With `include_usage`
    (`stream_options`), each says `usage: null` and `usage_line` closes them: OpenAI's clients
    read the usage from a last chunk with no choices."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def line(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> str:
        return self.line([{"index": 0, "delta": delta, "finish_reason": finish}])

    def usage_line(self, usage: dict[str, int]) -> str:
        return self.line([], usage)


def openai_error(exc: UserError) -> dict[str, Any]:
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return {
        "error": {
            "message": exc.message,
            "type": kind,
            "param": None,
            "code": exc.code,
            "hint": exc.hint,
        }
    }


async def openai_stream(
    generation: Generation,
    model: str,
    tool_names: set[str] | None = None,
    *,
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """SSE `data:` lines in OpenAI's chat.completion.chunk form, then `data: [DONE]`. With tools
    the answer comes in one chunk at the end: a call is known to be one only when it is whole.
    With `include_usage`, a chunk with the answer's usage comes right before `[DONE]`."""
    chunks = ChatChunks(model, include_usage)
    yield chunks.delta({"role": "assistant", "content": ""})
    try:
        async for token in generation.events():
            if tool_names is None:
                yield chunks.delta({"content": token})
    except UserError as exc:
        yield f"data: {json.dumps(openai_error(exc))}\n\n"
        return
    message, reason = _answer(generation, tool_names)
    if tool_names is not None:
        delta: dict[str, Any] = {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [
                {"index": index, **call} for index, call in enumerate(message["tool_calls"])
            ]
        yield chunks.delta(delta)
    yield chunks.delta({}, reason)
    if include_usage:
        yield chunks.usage_line(token_usage([generation.summary]))
    yield "data: [DONE]\n\n"


async def openai_completion(
    generation: Generation, model: str, tool_names: set[str] | None = None
) -> dict[str, Any]:
    async for _ in generation.events():
        pass
    message, reason = _answer(generation, tool_names)
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": reason,
            }
        ],
        "usage": token_usage([generation.summary]),
    }
