"""Request body limits through a real server (uvicorn subprocess, raw sockets): bodies are counted
while they are read, so a chunked body (no Content-Length) is stopped at the limit too."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from devkit.live_server import LiveServer

UPLOAD_CAP = 10_000
BODY_CAP = 4096
MULTIPART_HEAD = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)
ROW = b'{"text": "' + b"x" * 1000 + b'"}\n'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        tmp_path / "data",
        TUNEBOARD_UPLOAD_MAX_BYTES=str(UPLOAD_CAP),
        TUNEBOARD_REQUEST_BODY_MAX_BYTES=str(BODY_CAP),
    ).start()
    yield live
    live.stop()


def head(method: str, path: str, content_type: str, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield b"%x\r\n%s\r\n" % (len(part), part)


def exchange(port: int, request_head: bytes, body: Iterable[bytes]) -> tuple[int, bytes]:
    """Send a request whose body may never end, then read the answer: the server must answer
    without waiting for the rest (the socket's timeout fails the test otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request_head)
        with contextlib.suppress(OSError):  # the server may close once it has answered
            for piece in body:
                s.sendall(piece)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, response.read()


def test_a_chunked_upload_is_stopped_at_the_cap_with_413_and_no_temp_file(server):
    # Sent up to a little past the cap (multipart framing included) and never finished.
    rows = [MULTIPART_HEAD] + [ROW] * ((UPLOAD_CAP + 64 * 1024) // len(ROW) + 3)
    request_head = head(
        "POST",
        "/api/datasets",
        "multipart/form-data; boundary=XyZ",
        transfer_encoding="chunked",
    )
    status, body = exchange(server.port, request_head, chunked(rows))
    assert status == 413
    assert json.loads(body)["error"]["code"] == "upload_too_large"
    assert list((server.data_dir / "tmp").iterdir()) == []
    assert list((server.data_dir / "datasets").iterdir()) == []
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/api/jobs", "/v1/chat/completions"])
def test_a_json_body_over_the_limit_is_413_before_it_is_read(server, path):
    big = json.dumps({"name": "x" * (BODY_CAP + 1)})
    response = httpx.post(
        server.url + path, content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "body_too_large"
    assert str(BODY_CAP) in error["message"]
    assert "TUNEBOARD_REQUEST_BODY_MAX_BYTES" in error["hint"]


def test_a_chunked_json_body_is_stopped_at_the_limit(server):
    endless = [b'{"name": "'] + [b"x" * 1024] * (BODY_CAP // 1024 + 2)
    status, body = exchange(
        server.port,
        head("POST", "/api/jobs", "application/json", transfer_encoding="chunked"),
        chunked(endless),
    )
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_bodies_under_the_limit_are_served_as_before(server):
    response = httpx.post(server.url + "/api/jobs", json={"name": "x" * 100})
    assert response.status_code == 422  # read and validated, not refused for its size
    upload = httpx.post(
        server.url + "/api/datasets", files={"file": ("t.jsonl", ROW * (UPLOAD_CAP // len(ROW)))}
    )
    assert upload.status_code == 201, upload.text


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_upload_is_one_line_in_the_log(server):
    request_head = head(
        "POST", "/api/datasets", "multipart/form-data; boundary=XyZ", content_length="9000"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(request_head + MULTIPART_HEAD + ROW * 2)
    assert wait_for(lambda: server.log_path.read_text().strip() != "")  # the server noticed
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert list((server.data_dir / "tmp").iterdir()) == []
    server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == 1, log
    assert "disconnected" in lines[0] and "/api/datasets" in lines[0]
