"""Jinja2 templates (autoescaped: user data and model output always render as text)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.services.job_views import lost_contact
from app.tool_calls import parse_tool_calls
from app.units import human_bytes

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

templates = Jinja2Templates(directory=TEMPLATES_DIR)


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def time_ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (datetime.now(UTC) - when).total_seconds()
    if seconds < 60:
        return f"{max(0, int(seconds))} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return when.strftime("%Y-%m-%d")


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


templates.env.filters["bytes"] = human_bytes
templates.env.tests["lost_contact"] = lost_contact
templates.env.filters["count"] = human_count
templates.env.filters["ago"] = time_ago
templates.env.filters["duration"] = duration
# An answer kept in a playground session: its text and the tool calls it made (shown as calls).
templates.env.filters["tool_calls"] = lambda text: parse_tool_calls(text, set())
templates.env.filters["tojson_attr"] = lambda value: json.dumps(value, separators=(",", ":"))


@cache
def vendor(package: str) -> str:
    """URL of a vendored package folder, `static/vendor/<package>-<version>/`."""
    matches = sorted((STATIC_DIR / "vendor").glob(f"{package}-[0-9]*"))
    if not matches:
        raise LookupError(f"static/vendor has no {package}")
    return f"/static/vendor/{matches[-1].name}"


templates.env.globals["vendor"] = vendor


def render(
    request: Request, template: str, /, status_code: int = 200, **context: Any
) -> HTMLResponse:
    # Positional-only, so a template variable may be called `name` or `template`.
    return templates.TemplateResponse(request, template, context, status_code=status_code)
