"""A chat sent while a job trains on the chat's GPU says what it waits for, in a real browser.

The "worker" is a stand-in inference server that holds its answer (a model load behind a
training job) until the test lets it go, then streams the worker's protocol."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect

from app.models import BaseModelEntry, Worker
from app.services import playground
from devkit.simulated_run import start_running_job

pytestmark = pytest.mark.browser

MODEL = "waiting-base"
GPU_FREE = threading.Event()


class _SlowHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        GPU_FREE.wait(timeout=30)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(f"data: {json.dumps({'token': 'Hello.'})}\n\n".encode())
        done = {"done": True, "finish_reason": "stop", "completion_tokens": 1}
        self.wfile.write(f"data: {json.dumps(done)}\n\n".encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def slow_inference() -> Iterator[str]:
    GPU_FREE.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    GPU_FREE.set()
    server.shutdown()


def test_a_chat_behind_a_training_job_names_the_job_it_waits_for(
    live_server, server_db, slow_inference, page
):
    claim = start_running_job(server_db, "kettle facts", worker="gpu-worker")
    with server_db.write() as s:
        s.add(BaseModelEntry(name=MODEL, source="/nonexistent/waiting-base", is_local=True))
        s.add(
            Worker(
                id="gpu-worker",
                host="test",
                pid=1,
                gpus="0",
                inference_url=slow_inference,
                inference_secret="stand-in-secret",
                current_job_id=claim.job_id,
            )
        )
    session = playground.create_session(server_db, MODEL)
    page.goto(f"{live_server.url}/playground/sessions/{session.id}")
    page.fill("textarea[name=message]", "hello?")
    page.press("textarea[name=message]", "Enter")
    expect(page.locator(".chat-stats")).to_have_text(
        f"Waiting for the GPU: job kettle facts (#{claim.job_id}) is training…"
    )

    GPU_FREE.set()
    expect(page.locator(".msg-assistant").last).to_have_text("Hello.")
    expect(page.locator(".chat-stats")).to_contain_text("first token")
    assert page.js_errors == []
