"""Errors a user can meet, typed, each with what to do. Turned into one JSON/HTML shape at the edge."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by what the user asked for; `hint` says what to do about it."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        hint: str = "",
        *,
        code: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


class NotFound(UserError):
    status_code = 404
    code = "not_found"


class Conflict(UserError):
    status_code = 409
    code = "conflict"
