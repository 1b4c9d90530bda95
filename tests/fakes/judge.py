"""A small OpenAI-compatible chat server standing in for the evaluation report's judge (real
HTTP, on a free port): it prefers the answer that equals the reference, misbehaves for prompts
that say so, and, like a real endpoint, can want a key and know only some models."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.keys: list[str] = []
        self.bodies: list[dict] = []
        self.misbehave: dict[str, str] = {}  # a prompt -> slow | nonsense | error
        self.key: str | None = None  # set: a request without this bearer key gets a 401
        self.models: set[str] | None = None  # set: another model gets OpenAI's 404
        self.delay = 0.0  # seconds before it answers anything

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@contextmanager
def serving() -> Iterator[FakeJudge]:
    server = FakeJudge()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def asked(question: str) -> str:
    """The prompt inside a judge's question."""
    return question.split("Question:\n")[1].split("\n\nReference answer:")[0]


def answers(question: str) -> tuple[str, str, str]:
    """The reference, answer A and answer B inside a judge's question."""
    reference = question.split("Reference answer:\n")[1].split("\n\nAnswer A:")[0]
    first = question.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    second = question.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
    return reference, first, second


class Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.keys.append(self.headers.get("Authorization", ""))
        self.server.bodies.append(body)
        time.sleep(self.server.delay)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"detail": "Not Found"})
        given = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.server.key and given != self.server.key:
            # Quotes the key it was given back, as careless servers do.
            message = f"Incorrect API key provided: {given}." if given else "No API key provided."
            return self._error(401, message, "invalid_api_key")
        if self.server.models is not None and body["model"] not in self.server.models:
            message = f"The model `{body['model']}` does not exist."
            return self._error(404, message, "model_not_found")
        question = body["messages"][-1]["content"]
        if "Question:\n" not in question:  # not a pair to judge: a plain chat
            return self._reply("OK")
        how = self.server.misbehave.get(asked(question))
        if how == "slow":
            time.sleep(3)  # past the client's timeout: it has gone
            return
        if how == "error":
            self.send_response(500)
            self.end_headers()
            return
        if how == "nonsense":
            return self._reply("I like turtles")
        reference, first, second = answers(question)
        if first == second:
            return self._reply("tie")
        return self._reply("A" if first == reference else "B" if second == reference else "tie")

    def _reply(self, text: str) -> None:
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _error(self, status: int, message: str, code: str) -> None:
        self._send(
            status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        )

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            self.wfile.write(data)
