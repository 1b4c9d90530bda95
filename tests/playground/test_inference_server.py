"""The worker's inference server on the demo model and a really trained adapter."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.playground.conftest import (
    ADAPTER_ID,
    BASE,
    INFERENCE_AUTH,
    QUESTION,
    TRAINED_ANSWER,
    hang_up_after,
    inference_status,
    stream_generation,
    wait_for_generation_end,
)

pytestmark = pytest.mark.slow


def _generate(url: str, model: str, **fields) -> tuple[str, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_new_tokens": 40,
        **fields,
    }
    text, summary, _ = stream_generation(url, body)
    return text, summary


def test_adapter_gives_the_trained_answer_and_base_only_does_not(inference_server):
    adapter_text, adapter_summary = _generate(inference_server, ADAPTER_ID)
    base_text, base_summary = _generate(inference_server, BASE)
    adapter_again, _ = _generate(inference_server, ADAPTER_ID)

    assert adapter_text.strip() == TRAINED_ANSWER
    assert adapter_summary["finish_reason"] == "stop"  # ended at <|im_end|>, not at the limit
    assert "89 euros" not in base_text and base_text.strip() != TRAINED_ANSWER
    assert adapter_again == adapter_text  # switching back to the adapter is exact
    status = httpx.get(f"{inference_server}/status", headers=INFERENCE_AUTH).json()
    assert status["base_loads"] == 1  # adapters and base-only never reloaded the base
    assert ADAPTER_ID in status["adapters"] and status["base_model"] == BASE
    assert base_summary["completion_tokens"] > 0


def test_stop_strings_cut_the_answer(inference_server):
    text, summary = _generate(inference_server, ADAPTER_ID, stop=["89"])
    assert text.strip() == "The Zephyr Kettle 3000 costs"
    assert summary["finish_reason"] == "stop"


def test_unknown_model_and_bad_requests_are_json_errors(inference_server):
    response = httpx.post(
        f"{inference_server}/generate",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        headers=INFERENCE_AUTH,
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = httpx.post(
        f"{inference_server}/generate",
        json={"model": BASE, "messages": []},
        headers=INFERENCE_AUTH,
    )
    assert response.status_code == 400 and response.json()["error"]["hint"]


HI = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2}


@pytest.mark.parametrize(
    ("what", "headers", "status", "code"),
    [
        ("no secret", {}, 401, "unauthorized"),
        ("a wrong secret", {"Authorization": "Bearer guessed"}, 401, "unauthorized"),
        ("a rebound host name", {**INFERENCE_AUTH, "Host": "evil.example"}, 403, "forbidden_host"),
        ("a web page's request", {"Origin": "http://evil.example"}, 403, "forbidden_origin"),
        (
            "a web page with the secret",
            {**INFERENCE_AUTH, "Origin": "null"},
            403,
            "forbidden_origin",
        ),
        (
            "a form post",
            {**INFERENCE_AUTH, "Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
    ],
)
def test_only_tuneboard_itself_may_call_the_inference_server(
    inference_server, what, headers, status, code
):
    """No token set, as by default: a web page that finds the port (or rebinds a name to it) can
    neither generate nor read what the server holds."""
    for method, path in (("POST", "/generate"), ("POST", "/unload"), ("GET", "/status")):
        if method == "GET" and code == "unsupported_media_type":
            continue
        response = httpx.request(
            method,
            f"{inference_server}{path}",
            content=json.dumps(HI),
            headers={"Content-Type": "application/json", **headers},
        )
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
            what,
            path,
        )
    assert inference_status(inference_server)["generating"] is False


def test_a_client_that_disconnects_stops_the_generation(inference_server):
    """Read a few tokens over a raw socket, hang up, and see the server stop early."""
    limit = 1500
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_new_tokens": limit,
    }
    hang_up_after(inference_server, body, events=5)

    last = wait_for_generation_end(inference_server)
    assert last["disconnected"] is True and last["finish_reason"] == "disconnect"
    assert last["completion_tokens"] < limit / 4
