"""The playground: pick a model (or two to compare), chat, keep and continue the conversation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field

from app.errors import UserError
from app.services import inference_client as inference
from app.services import playground
from app.web.deps import DbDep, RowId, SettingsDep
from app.web.templating import render

router = APIRouter()


class PlaygroundTurn(BaseModel):
    """What the page's chat form posts (static/app.js): its fields plus `messages`. The history
    comes from the database, so a reloaded page continues the same conversation."""

    model_config = ConfigDict(extra="ignore")
    message: str = Field(default="", max_length=100_000)
    messages: list[dict[str, Any]] = []
    system: str | None = Field(default=None, max_length=20_000)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    tools: str = Field(default="", max_length=100_000)
    """Tool definitions as JSON text (the Settings' Tools box); "" for none."""


def _page(request: Request, db: Any, **context: Any) -> HTMLResponse:
    bases, adapters = inference.list_choices(db)
    return render(
        request,
        "playground/index.html",
        bases=bases,
        adapters=adapters,
        sessions=playground.list_sessions(db),
        **context,
    )


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
def playground_page(request: Request, db: DbDep, adapter: str = "") -> HTMLResponse:
    return _page(request, db, chosen=adapter)


@router.post("/playground/sessions", include_in_schema=False, response_model=None)
def create_session(
    request: Request,
    db: DbDep,
    model_a: Annotated[str, Form(max_length=200)],
    model_b: Annotated[str, Form(max_length=200)] = "",
    system_prompt: Annotated[str, Form(max_length=20_000)] = "",
) -> Response:
    try:
        session = playground.create_session(db, model_a, model_b or None, system_prompt)
    except UserError as exc:
        return _page(request, db, error=exc, chosen=model_a, status_code=exc.status_code)
    return RedirectResponse(f"/playground/sessions/{session.id}", status_code=303)


@router.get(
    "/playground/sessions/{session_id}", response_class=HTMLResponse, include_in_schema=False
)
def session_page(request: Request, db: DbDep, session_id: RowId) -> HTMLResponse:
    session = playground.get_session(db, session_id)
    panes = [(0, session.model_a)] + ([(1, session.model_b)] if session.model_b else [])
    history = {pane: playground.messages(db, session_id, pane) for pane, _ in panes}
    return render(request, "playground/session.html", session=session, panes=panes, history=history)


@router.get("/api/playground/sessions/{session_id}")
def session_json(db: DbDep, session_id: RowId) -> dict[str, Any]:
    return {
        "session": playground.get_session(db, session_id),
        "messages": playground.messages(db, session_id),
    }


@router.post("/playground/sessions/{session_id}/delete", include_in_schema=False)
def delete_session(db: DbDep, session_id: RowId) -> RedirectResponse:
    playground.delete_session(db, session_id)
    return RedirectResponse("/playground", status_code=303)


@router.get("/api/playground/gpu")
def gpu_wait(db: DbDep, settings: SettingsDep) -> dict[str, str | None]:
    """What a chat would wait for now: `waiting` names the job training on the chat's GPU."""
    return {"waiting": playground.gpu_wait(db, settings)}


@router.post("/playground/sessions/{session_id}/chat", response_model=None)
async def chat(
    db: DbDep,
    settings: SettingsDep,
    session_id: RowId,
    body: PlaygroundTurn,
    pane: Annotated[int, Query(ge=0, le=1)] = 0,
) -> Response:
    """One turn of one pane, streamed as OpenAI chunks; both turns are kept in the session."""
    session = playground.get_session(db, session_id)
    model = playground.pane_model(session, pane)
    text = body.message
    if not text and body.messages:
        text = str(body.messages[-1].get("content", ""))
    if not text.strip():
        raise UserError("Type a message first.", "")
    if pane == 0:  # both panes post the same settings; store them once
        playground.update_settings(
            db,
            session_id,
            system_prompt=body.system,
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_new_tokens,
        )
        session = playground.get_session(db, session_id)
    elif body.system is not None:
        session.system_prompt = body.system
    try:
        tools = playground.parse_tools(body.tools)
        messages = playground.conversation(db, session, pane, text)
        tool_names = inference.check_tools(db, inference.resolve_model(db, model), messages, tools)
        params = inference.generation_request(
            model=model,
            messages=messages,
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_new_tokens,
            tools=tools,
        )
        generation = inference.open_generation(db, settings, params)
        await generation.start()
    except UserError as exc:
        return JSONResponse(exc.to_json(), status_code=exc.status_code)
    playground.add_message(db, session_id, pane, model, "user", text)

    async def stream() -> AsyncIterator[str]:
        finish = "disconnect"
        try:
            async for line in inference.openai_stream(generation, model, tool_names):
                yield line
            finish = str(generation.summary.get("finish_reason") or "error")
        finally:
            with anyio.CancelScope(shield=True):
                await generation.aclose()
            summary = generation.summary
            playground.add_message(
                db,
                session_id,
                pane,
                model,
                "assistant",
                generation.text,
                finish_reason=finish,
                completion_tokens=summary.get("completion_tokens"),
                first_token_ms=summary.get("first_token_ms"),
                tokens_per_second=summary.get("tokens_per_second"),
            )

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
