"""Schemathesis hooks for test_fuzz.py (loaded through SCHEMATHESIS_HOOKS): every error response
has the app's one error shape and no stack trace."""

from __future__ import annotations

import schemathesis

TRACE_MARKERS = ("Traceback (most recent call last)", 'File "/', "sqlalchemy.exc", "Exception:")


@schemathesis.check
def error_shape_without_traces(ctx, response, case):
    text = response.text or ""
    for marker in TRACE_MARKERS:
        if marker in text:
            raise AssertionError(f"response body shows internals ({marker!r})")
    if response.status_code >= 400 and response.status_code != 405:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not {"code", "message", "hint"} <= set(error):
            raise AssertionError(
                f"error body is not {{'error': {{code, message, hint}}}}: {text[:200]}"
            )
        if "content-security-policy" not in response.headers:
            raise AssertionError("error response without a Content-Security-Policy")
    return None
