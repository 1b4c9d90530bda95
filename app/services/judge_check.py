"""The evaluation report's judge as the System page shows it, and "Check the judge": one short
chat completion asked from the web process, its outcome said in the user's words.

The judge itself runs in the worker (worker/judge.py, which the web process never imports). Each
process reads the TUNEBOARD_JUDGE_* settings of its own environment: this shows the web server's.
The key is sent as a bearer header and shown nowhere: the page says only whether one is set.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.settings import DEFAULT_JUDGE_RUBRIC, Settings, chat_completions_url

URL_HINT = (
    "TUNEBOARD_JUDGE_URL is the base URL of an OpenAI-compatible API, the part before "
    "/chat/completions, such as http://127.0.0.1:8080/v1."
)


@dataclass(frozen=True)
class JudgeSetup:
    """The judge the settings name, as the page may show it: its endpoint's host, never the key."""

    url_set: bool
    model: str
    host: str | None  # scheme://host:port of TUNEBOARD_JUDGE_URL; None: not an http(s) URL
    key_set: bool
    rubric: str  # the one in use: TUNEBOARD_JUDGE_RUBRIC, else the default
    rubric_is_default: bool
    timeout_seconds: float

    @property
    def configured(self) -> bool:
        return self.url_set and bool(self.model)


@dataclass(frozen=True)
class JudgeCheck:
    """Whether the judge answered one short question, and if not why, with what to do."""

    answered: bool
    message: str
    hint: str = ""


def endpoint_host(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL, without any user, password, path or query."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = parts.port
    except ValueError:
        return None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def judge_setup(settings: Settings) -> JudgeSetup:
    return JudgeSetup(
        url_set=bool(settings.judge_url.strip()),
        model=settings.judge_model,
        host=endpoint_host(settings.judge_url),
        key_set=settings.judge_api_key is not None,
        rubric=settings.judge_rubric or DEFAULT_JUDGE_RUBRIC,
        rubric_is_default=not settings.judge_rubric,
        timeout_seconds=settings.judge_timeout_seconds,
    )


def judge_variables() -> list[tuple[str, str]]:
    """The environment variables that set the judge up, each with its help (the settings' own)."""
    return [
        (f"TUNEBOARD_{name.upper()}", field.description or "")
        for name, field in Settings.model_fields.items()
        if name.startswith("judge_")
    ]


def _error_said(response: httpx.Response) -> tuple[str, str]:
    """What an error response says, and its code: OpenAI's {"error": {"message", "code"}},
    a bare {"error": "..."} or {"detail": ...}, or the start of its text."""
    try:
        body: Any = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200], ""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict):
            return str(error.get("message") or ""), str(error.get("code") or "")
        if error is not None:
            return str(error), ""
    return str(body)[:200], ""


def _refused(status: int, said: str, code: str, setup: JudgeSetup) -> JudgeCheck:
    """A judge that answered with an HTTP error, in the user's words."""
    said_part = f": {said}" if said else "."
    if status in (401, 403):
        if setup.key_set:
            return JudgeCheck(
                False,
                f"The judge refused the key (HTTP {status}){said_part}",
                "Check TUNEBOARD_JUDGE_API_KEY: it is sent as the bearer key.",
            )
        return JudgeCheck(
            False,
            f"The judge wants a key (HTTP {status}) and none is set{said_part}",
            "Set TUNEBOARD_JUDGE_API_KEY where the web server and the workers run.",
        )
    if code == "model_not_found" or (status in (400, 404) and "model" in said.lower()):
        return JudgeCheck(
            False,
            f"The judge does not know the model {setup.model!r} (HTTP {status}){said_part}",
            "Set TUNEBOARD_JUDGE_MODEL to a model the endpoint serves (its /models lists them).",
        )
    if status == 404:
        return JudgeCheck(
            False, "Nothing answers chat completions at that URL (HTTP 404).", URL_HINT
        )
    return JudgeCheck(False, f"The judge answered HTTP {status}{said_part}", "")


async def check_judge(settings: Settings) -> JudgeCheck:
    """Ask the configured judge for one short chat completion, within its timeout."""
    setup = judge_setup(settings)
    if not setup.configured:
        return JudgeCheck(
            False,
            "No judge is set up.",
            "Set TUNEBOARD_JUDGE_URL and TUNEBOARD_JUDGE_MODEL, then restart the server.",
        )
    if setup.host is None:
        return JudgeCheck(False, "TUNEBOARD_JUDGE_URL is not an http:// or https:// URL.", URL_HINT)
    key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else ""
    return await _ask(settings.judge_url, setup, key)


def _why_unreachable(exc: BaseException) -> str:
    """The cause of a failed connection in the user's words, from the errors under httpx's."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "nothing listens on that port (connection refused)"
        if isinstance(cause, socket.gaierror):
            return f"its host name does not resolve ({cause.strerror})"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


async def _ask(url: str, setup: JudgeSetup, key: str) -> JudgeCheck:
    def quoted(text: str) -> str:  # what the server says, less the key should it quote it back
        return text.replace(key, "[key]") if key else text

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": setup.model,
        "messages": [{"role": "user", "content": "Reply with one word: OK"}],
        "temperature": 0,
        "max_tokens": 5,
    }
    seconds = setup.timeout_seconds
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=seconds) as client:
            response = await client.post(
                chat_completions_url(url.strip()), json=body, headers=headers
            )
    except httpx.ConnectTimeout:
        return JudgeCheck(
            False,
            f"The judge at {setup.host} is unreachable: no connection within {seconds:g} s.",
            "Check TUNEBOARD_JUDGE_URL, and that this machine can reach that host and port.",
        )
    except httpx.TimeoutException:
        return JudgeCheck(
            False,
            f"The judge at {setup.host} did not answer within {seconds:g} s.",
            "It may be busy or still loading its model; TUNEBOARD_JUDGE_TIMEOUT_SECONDS sets how "
            "long it gets.",
        )
    except httpx.HTTPError as exc:
        return JudgeCheck(
            False,
            f"The judge at {setup.host} is unreachable: {quoted(_why_unreachable(exc))}.",
            "Check TUNEBOARD_JUDGE_URL, and that the judge's server is running and reachable "
            "from this machine.",
        )
    took = time.perf_counter() - started
    if response.status_code >= 400:
        said, code = _error_said(response)
        return _refused(response.status_code, quoted(said[:300]), code, setup)
    try:
        reply = response.json()["choices"][0]["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return JudgeCheck(
            False,
            f"The judge answered (HTTP {response.status_code}), but not with an OpenAI chat "
            "completion.",
            URL_HINT,
        )
    said = f": {quoted(' '.join(str(reply).split())[:40])!r}" if str(reply).strip() else "."
    return JudgeCheck(True, f"The judge answered in {took:.2f} s ({setup.model}){said}")
