"""Model output in the playground is text, in a real browser: an answer containing `<script>` and
`<img onerror>` shows literally, both while it streams in and when the kept session is reloaded,
and no dialog opens. The "model" is a stand-in inference server speaking the worker's protocol
(`data: {"token": ...}` lines, then `data: {"done": true}`), registered as a live worker."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect

from app.models import BaseModelEntry, Worker, utcnow
from app.services import playground

pytestmark = pytest.mark.browser

MODEL = "xss-base"
ANSWER_PIECES = ["Sure: ", "<script>alert(1)</script>", " and ", "<img src=x onerror=alert(1)>"]
ANSWER = "".join(ANSWER_PIECES)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.headers.get("authorization") != "Bearer stand-in-secret":
            self.send_response(401)  # as the real server answers a caller without its secret
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for piece in ANSWER_PIECES:
            self.wfile.write(f"data: {json.dumps({'token': piece})}\n\n".encode())
            self.wfile.flush()
        done = {"done": True, "finish_reason": "stop", "completion_tokens": len(ANSWER_PIECES)}
        self.wfile.write(f"data: {json.dumps(done)}\n\n".encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_inference(app_server) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    stop = threading.Event()

    def heartbeat() -> None:  # a live worker: the web only uses one that heartbeated lately
        while not stop.wait(0.5):
            with app_server.db.write() as s:
                row = s.get(Worker, "xss-worker")
                if row is not None:
                    row.heartbeat_at = utcnow()
                    s.add(row)

    with app_server.db.write() as s:
        if s.get(BaseModelEntry, MODEL) is None:
            s.add(BaseModelEntry(name=MODEL, source="/nonexistent/xss-base", is_local=True))
        s.add(
            Worker(
                id="xss-worker",
                host="test",
                pid=1,
                inference_url=url,
                inference_secret="stand-in-secret",
            )
        )
    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        server.shutdown()
        with app_server.db.write() as s:
            row = s.get(Worker, "xss-worker")
            if row is not None:
                s.delete(row)


def test_streamed_and_kept_model_output_is_literal_text(app_server, fake_inference, page, dialogs):
    session = playground.create_session(app_server.db, MODEL)
    page.goto(f"{app_server.url}/playground/sessions/{session.id}")
    page.fill("textarea[name=message]", "say something risky")
    page.press("textarea[name=message]", "Enter")
    answer = page.locator(".msg-assistant").last
    expect(answer).to_contain_text("onerror=alert(1)>", timeout=20_000)
    expect(page.locator(".msg-assistant.streaming")).to_have_count(0, timeout=20_000)

    for phase in ("streamed", "reloaded"):
        bubble = page.locator(".msg-assistant").last
        assert bubble.inner_text().strip() == ANSWER, phase
        assert page.locator(".msg-assistant script").count() == 0, phase
        assert page.locator(".msg-assistant img").count() == 0, phase
        page.reload()
        page.wait_for_url(re.compile(rf"/playground/sessions/{session.id}$"))

    stored = [m.content for m in playground.messages(app_server.db, int(session.id))]
    assert stored[-1] == ANSWER
    page.wait_for_timeout(500)  # an onerror handler would have fired by now
    assert dialogs == [] and page.js_errors == []
