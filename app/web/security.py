"""Request guards that keep a dashboard on a GPU box from becoming a remote shell.

- Host header must be a loopback name or a configured one (DNS rebinding).
- State-changing requests from a browser must carry the site's own Origin (cross-site requests).
- With a token set, every route but the login page and static files needs it: a bearer header, or
  the cookie the login page sets. Compared in constant time.
- Every response carries a Content-Security-Policy that allows only the site's own scripts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import LOOPBACK_NAMES, Settings

COOKIE_NAME = "tuneboard_session"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC_PREFIXES = ("/login", "/static/")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


def session_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the token itself is not stored."""
    return hmac.new(token.encode(), b"tuneboard-session", hashlib.sha256).hexdigest()


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_NAMES, *settings.allowed_hosts)}
        if settings.host not in ("0.0.0.0", "::", ""):
            self.allowed_hosts.add(settings.host.lower())
        self.token = settings.token.get_secret_value() if settings.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        wants_html = "text/html" in headers.get("accept", "") and not path.startswith(
            ("/api", "/v1")
        )

        host = _host_name(headers.get("host", ""))
        if host not in self.allowed_hosts:
            await _refuse(
                send,
                403,
                "forbidden_host",
                f"Requests for host {host!r} are refused.",
                "Open the dashboard through 127.0.0.1 or localhost, or add this name to "
                "TUNEBOARD_ALLOWED_HOSTS.",
            )
            return

        if scope["method"] in UNSAFE_METHODS and not self._same_origin(headers):
            await _refuse(
                send,
                403,
                "forbidden_origin",
                "Cross-site request refused.",
                "State-changing requests must come from the dashboard's own pages.",
            )
            return

        if self.token and not path.startswith(PUBLIC_PREFIXES) and not self._authenticated(headers):
            if wants_html:
                await _redirect(send, f"/login?next={path}")
                return
            await _refuse(
                send,
                401,
                "unauthorized",
                "This dashboard needs its access token.",
                "Send 'Authorization: Bearer <TUNEBOARD_TOKEN>' or log in at /login.",
                extra_headers=[(b"www-authenticate", b"Bearer")],
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _same_origin(self, headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None:
            # Browsers send Origin (or at least Sec-Fetch-Site) on every cross-site POST; scripts
            # and API clients send neither and are governed by the token instead.
            return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        parsed = urlsplit(origin)
        return parsed.netloc.lower() == headers.get("host", "").lower() and bool(parsed.scheme)

    def _authenticated(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            return False
        morsel = cookie.get(COOKIE_NAME)
        return morsel is not None and hmac.compare_digest(
            morsel.value.encode(), session_value(self.token).encode()
        )


async def _refuse(
    send: Send,
    status: int,
    code: str,
    message: str,
    hint: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
    ]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers + (extra_headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", location.encode()),
                (b"content-length", b"0"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
