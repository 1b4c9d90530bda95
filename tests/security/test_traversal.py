"""Paths come from server-made ids, never from what a client sends: traversal in upload names and
in every path parameter, the upload size cap, and the accepted file types."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.security.conftest import (
    ALPACA_ROWS,
    ORIGIN,
    PLACEHOLDER,
    TOKEN,
    all_routes,
)

HEX_ID = re.compile(r"[0-9a-f]{32}")


def multipart(filename: bytes, content: bytes) -> tuple[bytes, str]:
    """A multipart body built by hand, so the filename reaches the server byte for byte."""
    boundary = "tuneboardboundary7MA4YWxkTrZu0gW"
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def post_file(client: TestClient, filename: bytes, content: bytes):
    body, content_type = multipart(filename, content)
    return client.post("/api/datasets", content=body, headers={"content-type": content_type})


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "filename",
    [
        b"../../x.jsonl",
        b"../../../../../../tmp/owned.jsonl",
        b"%2e%2e%2f%2e%2e%2fx.jsonl",
        b"..%2fx.jsonl",
        b"..\\..\\x.jsonl",
        b"/etc/cron.d/x.jsonl",
        b"C:\\Windows\\x.jsonl",
        b"a\x00b.jsonl",
        b"x.jsonl\x00.pkl",
        b"\xff\xfe.jsonl",
        b"<script>alert(1)</script>.jsonl",
        b"a" * (1024 * 1024) + b".jsonl",  # a 1 MB name
    ],
)
def test_upload_names_are_display_text_and_storage_uses_server_ids(
    authed, token_settings, tmp_path, filename
):
    before = files_under(tmp_path)
    response = post_file(authed, filename, ALPACA_ROWS)
    if response.status_code != 201:  # refusing a name is fine; crashing or using it is not
        assert response.status_code in (400, 413, 415, 422), response.text[:300]
        assert files_under(tmp_path) == before
        return
    body = response.json()
    shown = body["original_filename"]
    assert HEX_ID.fullmatch(body["id"])
    assert "/" not in shown and "\\" not in shown and "\x00" not in shown
    assert len(shown) <= 255
    # The database's own WAL files come and go with its connections; they are not upload files.
    database = token_settings.resolved_data_dir / "tuneboard.db"
    new = {p for p in files_under(tmp_path) - before if not p.name.startswith(database.name)}
    folder = token_settings.datasets_dir / body["id"]
    assert new and all(p.parent == folder for p in new), new
    assert all(p.name in ("original.jsonl", "normalized.jsonl", "split.json") for p in new)
    assert not Path("/tmp/owned.jsonl").exists()


def test_a_dataset_name_field_is_display_text_too(authed, tmp_path):
    response = authed.post(
        "/api/datasets",
        files={"file": ("rows.jsonl", ALPACA_ROWS)},
        data={"name": "../../etc/passwd\x00\r\nX-Injected: 1"},
    )
    assert response.status_code == 201
    body = response.json()
    assert "\x00" not in body["name"] and "\r" not in body["name"] and "\n" not in body["name"]


TRAVERSALS = [
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e",
    "..%5C..%5Cetc%5Cpasswd",
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
    "%00",
    "x%00.jsonl",
    "%252e%252e%252fetc",
    "~root",
    "%2Fetc%2Fpasswd",
]


def _param_routes(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in all_routes(app) if "{" in p]


def test_traversal_in_every_path_parameter_is_404_or_422(token_app, authed, seeded):
    wrong = []
    for method, template in _param_routes(token_app):
        for attack in TRAVERSALS:
            for name in PLACEHOLDER.findall(template):
                path = template
                for other in PLACEHOLDER.findall(template):
                    value = attack if other == name else _valid(other, seeded)
                    path = re.sub(r"\{" + other + r"(:\w+)?\}", value, path)
                response = authed.request(method, path, headers={"origin": ORIGIN})
                if response.status_code not in (404, 405, 422) or "root:" in response.text:
                    wrong.append(f"{method} {path} -> {response.status_code}")
    assert not wrong, wrong


def _valid(param: str, seeded) -> str:
    return {
        "job_id": str(seeded.job_id),
        "dataset_id": seeded.dataset_id,
        "name": seeded.model,
        "action": "cancel",
        "report_id": "1",
        "merge_id": "1",
        "session_id": "1",
        "adapter_id": "job-1",
    }[param]


def raw_get(app, raw_path: bytes) -> tuple[int, bytes]:
    """Send a request line exactly as given (literal `..` segments that HTTP clients would
    normalise away), with the path decoded as uvicorn decodes it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize(
    "raw",
    [
        b"/static/../app/settings.py",
        b"/static/../../../../etc/passwd",
        b"/static/%2e%2e/app/settings.py",
        b"/static/..%2f..%2f..%2fetc%2fpasswd",
        b"/static/vendor/../../app/settings.py",
        b"/static//etc/passwd",
        b"/static/%00",
        b"/api/models/../../etc/passwd",
        b"/api/models/..%2F..%2Fetc%2Fpasswd",
        b"/api/datasets/../../../etc/passwd",
        b"/api/jobs/../../etc/passwd",
        b"/jobs/../../etc/passwd",
    ],
)
def test_literal_dot_segments_never_reach_a_file_outside(token_app, raw):
    with TestClient(token_app):  # run the lifespan once
        pass
    status, body = raw_get(token_app, raw)
    assert status in (404, 405, 422), (raw, status)
    assert b"root:" not in body and b"class Settings" not in body


@pytest.fixture
def small_cap(token_settings: Settings, token_app) -> TestClient:
    from app.main import create_app

    small = token_settings.model_copy(update={"upload_max_bytes": 1000})
    with TestClient(
        create_app(small), base_url="http://127.0.0.1", headers={"authorization": f"Bearer {TOKEN}"}
    ) as c:
        yield c


def test_an_upload_one_byte_over_the_cap_is_413_and_its_temp_file_is_gone(
    small_cap, token_settings
):
    row = b'{"text": "' + b"x" * 987 + b'"}\n'
    assert len(row) == 1000
    at_cap = small_cap.post("/api/datasets", files={"file": ("t.jsonl", row)})
    assert at_cap.status_code == 201, at_cap.text
    over = small_cap.post("/api/datasets", files={"file": ("t.jsonl", row + b" ")})
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "upload_too_large"
    assert list(token_settings.tmp_dir.iterdir()) == []
    assert len(list(token_settings.datasets_dir.iterdir())) == 1  # only the one at the cap


def test_a_huge_declared_length_is_413_before_reading(small_cap, token_settings):
    body, content_type = multipart(b"t.jsonl", b"{}")
    response = small_cap.post(
        "/api/datasets",
        content=body,
        headers={"content-type": content_type, "content-length": str(50 * 1024**3)},
    )
    assert response.status_code in (400, 413)
    assert list(token_settings.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "model.pkl",
        "weights.bin",
        "x.pt",
        "x.pth",
        "a.zip",
        "page.html",
        "run.exe",
        "script.py",
        "noext",
        "x.jsonl.pkl",
        "x.jsonl.",
        ".jsonl.exe",
        "x.JSONL.PKL",
    ],
)
def test_disallowed_types_are_415_and_nothing_is_kept(authed, token_settings, name):
    response = authed.post("/api/datasets", files={"file": (name, ALPACA_ROWS)})
    assert response.status_code == 415, (name, response.status_code)
    assert response.json()["error"]["code"] == "unsupported_file_type"
    assert list(token_settings.tmp_dir.iterdir()) == []
    assert list(token_settings.datasets_dir.iterdir()) == []
