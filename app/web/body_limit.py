"""Request body limits, counted while the body is read (one ASGI middleware for every route).

A declared Content-Length over the limit is answered 413 before anything is read; a chunked body
(no Content-Length) is stopped at the limit: the server reads no further, whatever the route was
doing with it (FastAPI's JSON parsing, the multipart parser's spooled files) is dropped, and the
413 goes out instead. Dataset uploads get the upload cap; every other body gets the much smaller
`request_body_max_bytes`, so a JSON request cannot hold gigabytes of the server's memory.

A client that leaves while its body is being read is one line in the log, not a traceback.
"""

from __future__ import annotations

import json
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import UserError
from app.services import datasets
from app.settings import Settings

log = logging.getLogger("tuneboard.requests")

# Multipart framing and the small form fields around the file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
UPLOAD_ROUTES = {("POST", "/api/datasets")}


class BodyTooLarge(UserError):
    status_code = 413
    code = "body_too_large"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> tuple[int, UserError]:
        """The most bytes this request's body may have, and the error past that."""
        if (scope["method"], scope["path"]) in UPLOAD_ROUTES:
            cap = self.settings.upload_max_bytes
            return cap + MULTIPART_OVERHEAD_BYTES, datasets.too_large(self.settings)
        cap = self.settings.request_body_max_bytes
        return cap, BodyTooLarge(
            f"The request body is larger than the limit of {cap} bytes.",
            "Send less at once, or ask the operator to raise TUNEBOARD_REQUEST_BODY_MAX_BYTES.",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, error = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _answer(send, error)
            return
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            if over:
                raise error
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise error
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the route's answer to a body it could not read; ours goes out below
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except ClientDisconnect:
            method, path = scope["method"], scope["path"]
            log.warning("%s %s: the client disconnected before its request was read", method, path)
            return
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(send, error)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            digits = value.strip()
            if digits.isdigit():
                return int(digits) if len(digits) <= 20 else 2**70
    return None


async def _answer(send: Send, error: UserError) -> None:
    body = json.dumps(error.to_json()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
