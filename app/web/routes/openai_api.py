"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/chat/completions (stream and not, with
`tools` for models whose chat template takes them) and the legacy POST /v1/completions; a stream
ends on its usage when `stream_options.include_usage` asks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from app.errors import UserError
from app.services import completions
from app.services import inference_client as inference
from app.web.deps import DbDep, SettingsDep

router = APIRouter(prefix="/v1")

DEFAULT_MAX_TOKENS = 512
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for the legacy completions
MAX_PROMPTS = 1000


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=200)


class ToolIn(BaseModel):
    """A tool definition: `{"type": "function", "function": {"name", "description", "parameters"}}`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionIn


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=200)
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(default=None, max_length=200)
    type: Literal["function"] = "function"
    function: CalledFunction


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`, taken with `stream: true` only; other keys are ignored."""

    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = None
    """true: every chunk says `usage: null`, and one more, with `choices: []`, brings the usage
    of the whole request right before `data: [DONE]`."""


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = ""
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)


class ChatCompletionRequest(BaseModel):
    """The part of OpenAI's request Tuneboard honours; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1000)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolIn] | None = Field(default=None, max_length=128)
    n: int = Field(default=1, ge=1, le=128)
    """Only 1: one answer per request."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    """"auto" (the model decides) or "none" (no tools offered); forcing a call is refused."""
    response_format: dict[str, Any] | None = None
    """Only {"type": "text"}: the answer is not constrained to JSON."""
    logprobs: bool | None = None
    """Only false: a chat answer's log-probabilities are not returned."""


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request; other fields (`suffix`, `best_of`, `user`, ...) are
    accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    """A base model's name or an adapter's id, as GET /v1/models lists them."""
    prompt: str | list[str] | list[int] | list[list[int]]
    """A text, a list of texts, a list of token ids, or a list of lists of token ids; each prompt
    is one choice of the answer."""
    max_tokens: int | None = Field(default=DEFAULT_COMPLETION_TOKENS, ge=0, le=4096)
    """0 with `echo`: the prompt alone comes back (scored when `logprobs` is set)."""
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    """Only 1: one completion per prompt."""
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Each token's log-probability and this many most likely alternatives (0 to 5)."""
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


def _openai_error_response(exc: UserError) -> JSONResponse:
    return JSONResponse(inference.openai_error(exc), status_code=exc.status_code)


def _one_choice(n: int) -> None:
    """Tuneboard samples one answer per prompt; asking for more is refused, not answered short."""
    if n != 1:
        raise UserError(
            f"n is {n}; Tuneboard returns one completion per prompt (n = 1).",
            "Leave n out, or send the request again (with another seed) for more samples.",
            code="invalid_n",
        )


def _refuse_what_is_not_honoured(body: ChatCompletionRequest) -> None:
    """What a chat request asks for that Tuneboard would otherwise drop in silence: a 400 that
    says so and what to send instead."""
    _one_choice(body.n)
    for i, message in enumerate(body.messages):
        parts = message.content if isinstance(message.content, list) else []
        kinds = sorted({str(p.get("type")) for p in parts} - {"text"})
        if kinds:
            raise UserError(
                f"messages[{i}] has a part of type {', '.join(map(repr, kinds))}; the models "
                "Tuneboard serves read text only.",
                "Send the message's text parts alone (or its text as a string).",
                code="unsupported_content",
            )
    if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
        raise UserError(
            "tool_choice asks for a tool call to be forced; Tuneboard lets the model decide.",
            'Leave tool_choice out (or send "auto"), or "none" to offer no tools.',
            code="unsupported_tool_choice",
        )
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise UserError(
            f"response_format {kind!r} is not supported: the answer is not constrained to JSON.",
            "Leave response_format out and ask for JSON in the messages (an adapter trained on "
            "JSON answers gives them), then parse the answer.",
            code="unsupported_response_format",
        )
    if body.logprobs:
        raise UserError(
            "logprobs is not supported on /v1/chat/completions.",
            "Use /v1/completions with the chat template applied to the prompt: it returns each "
            "token's log-probability (logprobs 0-5, with echo the prompt's too).",
            code="unsupported_logprobs",
        )


def _include_usage(stream: bool, options: StreamOptions | None) -> bool:
    """Whether the stream ends on a usage chunk; OpenAI refuses `stream_options` without
    `stream`, and so does Tuneboard, rather than drop what the client asked for."""
    if options is None:
        return False
    if not stream:
        raise UserError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "Set stream to true, or leave stream_options out: the answer without streaming "
            "always has its usage.",
            code="invalid_stream_options",
        )
    return bool(options.include_usage)


@router.get("/models")
def list_models(db: DbDep) -> dict[str, Any]:
    bases, adapters = inference.list_choices(db)
    data = [
        {
            "id": b.name,
            "object": "model",
            "created": int(b.created_at.timestamp()),
            "owned_by": "tuneboard",
            "kind": "base",
        }
        for b in bases
    ]
    data += [
        {
            "id": a.id,
            "object": "model",
            "created": int(a.created_at.timestamp()),
            "owned_by": "tuneboard",
            "kind": "adapter",
            "name": a.name,
            "base_model": a.base_model,
        }
        for a in adapters
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, db: DbDep, settings: SettingsDep
) -> Response:
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    offered = body.tools if body.tool_choice != "none" else None  # "none": no tool is offered
    tools = [t.model_dump() for t in offered] if offered else None
    try:
        include_usage = _include_usage(body.stream, body.stream_options)
        _refuse_what_is_not_honoured(body)
        choice = inference.resolve_model(db, body.model)
        tool_names = inference.check_tools(db, choice, messages, tools)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = inference.generation_request(
            model=body.model,
            messages=inference.template_messages(messages),
            tools=tools,
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            stop=stop,
            seed=body.seed,
        )
        generation = inference.open_generation(db, settings, params)
        await generation.start()
    except UserError as exc:
        return _openai_error_response(exc)

    if not body.stream:
        try:
            return JSONResponse(
                await inference.openai_completion(generation, body.model, tool_names)
            )
        except UserError as exc:
            return _openai_error_response(exc)
        finally:
            await generation.aclose()

    async def stream() -> AsyncIterator[str]:
        try:
            async for line in inference.openai_stream(
                generation, body.model, tool_names, include_usage=include_usage
            ):
                yield line
        finally:
            # Also runs when the client went away (the task is cancelled): closing the upstream
            # connection is what stops the generation on the GPU.
            with anyio.CancelScope(shield=True):
                await generation.aclose()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, db: DbDep, settings: SettingsDep) -> Response:
    try:
        include_usage = _include_usage(body.stream, body.stream_options)
        _one_choice(body.n)
        prompts = completions.prompts_of(body.prompt)
        if len(prompts) > MAX_PROMPTS:
            raise UserError(
                f"The request has {len(prompts)} prompts; at most {MAX_PROMPTS} are taken.",
                "Send them in several requests.",
                code="too_many_prompts",
            )
        inference.resolve_model(db, body.model)
        requests = completions.completion_requests(
            prompts,
            model=body.model,
            max_new_tokens=DEFAULT_COMPLETION_TOKENS
            if body.max_tokens is None
            else body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            echo=body.echo,
            logprobs=body.logprobs,
            seed=body.seed,
        )
        run = completions.Completions(db, settings, body.model, requests)
        await run.start()
    except UserError as exc:
        return _openai_error_response(exc)

    if not body.stream:
        try:
            return JSONResponse(await run.answer())
        except UserError as exc:
            return _openai_error_response(exc)
        finally:
            await run.aclose()

    async def stream() -> AsyncIterator[str]:
        try:
            async for line in run.stream(include_usage=include_usage):
                yield line
        finally:
            with anyio.CancelScope(shield=True):
                await run.aclose()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
