"""Playground conversations: sessions of one model (or two side by side) and their messages."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from app.db import Database
from app.errors import NotFound, UserError
from app.models import ChatMessage, ChatSession, Job, JobStatus, utcnow
from app.services.inference_client import resolve_model, serving_worker
from app.settings import Settings


def create_session(
    db: Database,
    model_a: str,
    model_b: str | None = None,
    system_prompt: str = "",
    *,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
) -> ChatSession:
    """A new conversation; `model_b` turns on compare mode (the same prompt to both)."""
    resolve_model(db, model_a)
    if model_b:
        resolve_model(db, model_b)
        if model_b == model_a:
            raise UserError(
                "Compare needs two different models.",
                "Pick the base model, or another adapter, for the second pane.",
            )
    title = model_a + (f" vs {model_b}" if model_b else "")
    session = ChatSession(
        title=title[:200],
        model_a=model_a,
        model_b=model_b or None,
        system_prompt=system_prompt,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
    )
    with db.write() as s:
        s.add(session)
        s.flush()
        s.refresh(session)
    return session


def list_sessions(db: Database, limit: int = 50) -> list[tuple[ChatSession, int]]:
    """Newest first, each with its number of messages."""
    with db.read() as s:
        counts = (
            select(ChatMessage.session_id, func.count().label("n"))
            .group_by(col(ChatMessage.session_id))
            .subquery()
        )
        rows = s.exec(
            select(ChatSession, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.session_id == ChatSession.id)
            .order_by(col(ChatSession.updated_at).desc())
            .limit(limit)
        ).all()
    return [(session, int(n)) for session, n in rows]


def get_session(db: Database, session_id: int) -> ChatSession:
    with db.read() as s:
        session = s.get(ChatSession, session_id)
    if session is None:
        raise NotFound(f"There is no chat session {session_id}.", "Start one on the Playground.")
    return session


def messages(db: Database, session_id: int, pane: int | None = None) -> list[ChatMessage]:
    with db.read() as s:
        query = select(ChatMessage).where(ChatMessage.session_id == session_id)
        if pane is not None:
            query = query.where(ChatMessage.pane == pane)
        return list(s.exec(query.order_by(col(ChatMessage.id))))


def pane_model(session: ChatSession, pane: int) -> str:
    model = session.model_a if pane == 0 else session.model_b if pane == 1 else None
    if model is None:
        raise NotFound(f"Chat session {session.id} has no pane {pane}.", "")
    return model


def conversation(db: Database, session: ChatSession, pane: int, user_text: str) -> list[dict]:
    """What the model sees: the system prompt, this pane's earlier turns, the new user turn."""
    turns: list[dict[str, Any]] = []
    if session.system_prompt.strip():
        turns.append({"role": "system", "content": session.system_prompt})
    for message in messages(db, int(session.id or 0), pane):
        if message.content:
            turns.append({"role": message.role, "content": message.content})
    turns.append({"role": "user", "content": user_text})
    return turns


def parse_tools(text: str) -> list[dict[str, Any]] | None:
    """The Tools box: a JSON list of OpenAI tool definitions (`{"type": "function", "function":
    {"name", ...}}`, or the bare function), or None when empty."""
    if not text.strip():
        return None
    hint = (
        'Write a JSON list such as [{"type": "function", "function": {"name": "get_weather", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}], or '
        "empty the box."
    )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"The tools are not JSON ({exc.msg}, line {exc.lineno}).", hint) from exc
    except RecursionError as exc:
        raise UserError("The tools are nested too deeply to read.", hint) from exc
    if not isinstance(value, list):
        raise UserError("The tools must be a JSON list of tool definitions.", hint)
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f'Tool {index + 1} has no "name".', hint)
        tools.append({"type": "function", "function": function})
    return tools or None


def update_settings(db: Database, session_id: int, **fields: Any) -> ChatSession:
    with db.write() as s:
        session = s.get(ChatSession, session_id)
        if session is None:
            raise NotFound(f"There is no chat session {session_id}.", "")
        for name, value in fields.items():
            if value is not None:
                setattr(session, name, value)
        session.updated_at = utcnow()
        s.add(session)
    return session


def add_message(
    db: Database, session_id: int, pane: int, model: str, role: str, content: str, **stats: Any
) -> ChatMessage:
    message = ChatMessage(
        session_id=session_id, pane=pane, model=model, role=role, content=content, **stats
    )
    with db.write() as s:
        s.add(message)
        session = s.get(ChatSession, session_id)
        if session is not None:
            session.updated_at = utcnow()
            s.add(session)
    return message


def delete_session(db: Database, session_id: int) -> None:
    with db.write() as s:
        session = s.get(ChatSession, session_id)
        if session is None:
            raise NotFound(f"There is no chat session {session_id}.", "")
        for message in s.exec(select(ChatMessage).where(ChatMessage.session_id == session_id)):
            s.delete(message)
        s.delete(session)


def gpu_wait(db: Database, settings: Settings) -> str | None:
    """What a chat waits for before its first token when the worker that serves chats is
    training: its GPU (a model load shares it with the job, or waits for memory)."""
    worker = serving_worker(db, settings)
    if worker is None or worker.current_job_id is None:
        return None
    with db.read() as s:
        job = s.get(Job, worker.current_job_id)
    if job is None or job.status != JobStatus.running:
        return None
    return f"Waiting for the GPU: job {job.name} (#{job.id}) is training"
