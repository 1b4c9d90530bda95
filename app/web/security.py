"""Request guards that keep a dashboard on a GPU box from becoming a remote shell.

- Host header must be a loopback name or a configured one (DNS rebinding).
- State-changing requests from a browser must carry the site's own Origin (cross-site requests).
- With a token set, every route but the login page and static files needs it: a bearer header, or
  the cookie the login page sets. Compared in constant time. WebSockets get the same checks.
- Every response carries a Content-Security-Policy that allows only the site's own scripts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any
from urllib.parse import quote, urlsplit

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.settings import LOOPBACK_NAMES, Settings, host_name

COOKIE_NAME = "tuneboard_session"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC_PATHS = ("/login",)
PUBLIC_PREFIXES = ("/static/",)
# Answered with 401, never a redirect: fetch(), EventSource, scripts and health probes.
MACHINE_PREFIXES = ("/api", "/v1", "/healthz")
CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]
_UNSAFE_IN_NEXT = re.compile(r"[\x00-\x20\x7f\\]")  # controls, spaces, backslash


def session_value(token: str) -> str:
    """What the login cookie holds: derived from the token, so the token itself is not stored."""
    return hmac.new(token.encode(), b"tuneboard-session", hashlib.sha256).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that also hides the expected length (both sides are hashed to
    32 bytes first; compare_digest alone returns early on a length mismatch)."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest(),
    )


def safe_next(target: str) -> str:
    """A post-login redirect target that stays on this site, else "/".

    Browsers read `\\` as `/` and drop tabs and newlines inside URLs, so `/\\evil.com` and
    `/\\t/evil.com` would leave the site as surely as `//evil.com`; all of them are refused.
    """
    if not target.startswith("/") or target.startswith("//") or _UNSAFE_IN_NEXT.search(target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        names = {host_name(h) for h in (*LOOPBACK_NAMES, *settings.allowed_hosts)}
        if settings.host not in ("0.0.0.0", "::", ""):
            bound = settings.host.strip("[]").lower()
            names |= {bound, f"[{bound}]"} if ":" in bound else {bound}
        self.allowed_hosts = names
        self.token = settings.token.get_secret_value() if settings.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._guard_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in present
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> Any:
        """None when the request may go on, else a coroutine function that answers it."""
        raw_hosts = [v for k, v in scope["headers"] if k.lower() == b"host"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]

        host = host_name(raw_hosts[0].decode("latin-1")) if len(raw_hosts) == 1 else ""
        if host not in self.allowed_hosts:
            shown = host or "(missing or repeated)"
            return lambda send: _refuse(
                send,
                403,
                "forbidden_host",
                f"Requests for host {shown!r} are refused.",
                "Open the dashboard through 127.0.0.1 or localhost, or add this name to "
                "TUNEBOARD_ALLOWED_HOSTS.",
            )

        scheme = str(scope.get("scheme", "http")).replace("wss", "https").replace("ws", "http")
        if scope.get("method", "GET") in UNSAFE_METHODS and not self._same_origin(headers, scheme):
            return lambda send: _refuse(
                send,
                403,
                "forbidden_origin",
                "Cross-site request refused.",
                "State-changing requests must come from the dashboard's own pages.",
            )

        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if self.token and not public and not self._authenticated(headers):
            query = scope.get("query_string", b"").decode("latin-1")
            back = quote(path, safe="/") + (f"?{query}" if query else "")
            login = "/login?next=" + quote(safe_next(back), safe="")
            if headers.get("hx-request") == "true":
                # htmx swaps no 4xx; HX-Redirect makes it load the login page as a whole page.
                extra = [(b"hx-redirect", login.encode())]
            elif "text/html" in headers.get("accept", "") and not path.startswith(MACHINE_PREFIXES):
                return lambda send: _redirect(send, login)
            else:
                extra = []
            return lambda send: _refuse(
                send,
                401,
                "unauthorized",
                "This dashboard needs its access token.",
                "Send 'Authorization: Bearer <TUNEBOARD_TOKEN>' or log in at /login.",
                extra_headers=[(b"www-authenticate", b"Bearer"), *extra],
            )
        return None

    async def _guard_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The same Host, Origin and token checks for WebSockets, which browsers open cross-site
        without any preflight (cross-site WebSocket hijacking). Closing before accepting makes
        the server answer the handshake with 403."""
        if self._refusal({**scope, "method": "POST"}) is not None:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)

    def _same_origin(self, headers: dict[str, str], scheme: str) -> bool:
        origin = headers.get("origin")
        if origin is None:
            # Every current browser sends Origin on a cross-origin POST/DELETE (and fetch sends
            # Sec-Fetch-Site); a request with neither comes from curl, a script or the OpenAI
            # client, which a web page cannot forge, and which the token governs instead.
            return headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        # Same origin = same scheme, host and port. Behind a TLS proxy the scheme is right when
        # uvicorn trusts the proxy's X-Forwarded-Proto (--forwarded-allow-ips).
        parsed = urlsplit(origin.strip())
        return parsed.scheme == scheme and parsed.netloc.lower() == (
            headers.get("host", "").strip().lower()
        )

    def _authenticated(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return same_secret(auth[7:].strip(), self.token)
        # Starlette's lenient parser: http.cookies gives up on the whole header when any one
        # cookie is malformed, and other apps on localhost share this host's cookie jar.
        value = cookie_parser(headers.get("cookie", "")).get(COOKIE_NAME)
        return value is not None and same_secret(value, session_value(self.token))


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
                (b"location", location.encode("latin-1")),
                (b"content-length", b"0"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})
