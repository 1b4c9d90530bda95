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


SQL_INT_MAX = 2**63 - 1  # the largest integer SQLite and PostgreSQL's BIGINT store


class InvalidNumber(UserError):
    status_code = 422
    code = "invalid"


def whole_number(text: str, field: str, hint: str, *, ge: int = 0, le: int = SQL_INT_MAX) -> int:
    """`text` (a header, form or list value a route reads by hand) as an integer in [ge, le], else
    InvalidNumber naming `field`: never a ValueError (int() refuses 4,300+ digits and takes '²'
    for a digit) nor a number the database driver cannot store."""
    digits = text.strip()
    if digits.isascii() and digits.isdigit() and len(digits) <= len(str(le)):
        number = int(digits)
        if ge <= number <= le:
            return number
    shown = digits if len(digits) <= 40 else digits[:40] + "…"
    raise InvalidNumber(
        f"The field {field} must be a whole number from {ge} to {le}, not {shown!r}.", hint
    )
