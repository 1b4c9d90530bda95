"""The worker's inference server on the demo model and a really trained adapter."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.playground.conftest import ADAPTER_ID, BASE, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow


def _generate(url: str, model: str, **fields) -> tuple[str, dict]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_new_tokens": 40,
        **fields,
    }
    text, summary = "", {}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("done"):
                    summary = event
                else:
                    text += event["token"]
    return text, summary


def test_adapter_gives_the_trained_answer_and_base_only_does_not(inference_server):
    adapter_text, adapter_summary = _generate(inference_server, ADAPTER_ID)
    base_text, base_summary = _generate(inference_server, BASE)
    adapter_again, _ = _generate(inference_server, ADAPTER_ID)

    assert adapter_text.strip() == TRAINED_ANSWER
    assert adapter_summary["finish_reason"] == "stop"  # ended at <|im_end|>, not at the limit
    assert "89 euros" not in base_text and base_text.strip() != TRAINED_ANSWER
    assert adapter_again == adapter_text  # switching back to the adapter is exact
    status = httpx.get(f"{inference_server}/status").json()
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
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = httpx.post(f"{inference_server}/generate", json={"model": BASE, "messages": []})
    assert response.status_code == 400 and response.json()["error"]["hint"]


def test_a_client_that_disconnects_stops_the_generation(inference_server):
    """Read a few tokens over a raw socket, hang up, and see the server stop early."""
    limit = 1500
    body = json.dumps(
        {
            "model": BASE,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_new_tokens": limit,
        }
    ).encode()
    address = urlsplit(inference_server)
    sock = socket.create_connection((address.hostname, address.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while received.count(b"data: ") < 5:
        received += sock.recv(4096)
    sock.close()

    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(f"{inference_server}/status").json()
        last = status["last_generation"]
        if last and last.get("finished") and not status["generating"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert last["disconnected"] is True and last["finish_reason"] == "disconnect"
    assert last["completion_tokens"] < limit / 4
