"""`tuneboard serve` refuses to listen beyond loopback without a token: a real subprocess, started
the way a user would start it (`python -m app.cli`), independent of any virtualenv layout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-long-enough-token-123"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNEBOARD_")}
    return {**clean, "TUNEBOARD_DATA_DIR": str(tmp_path / "data"), **extra}


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--no-worker", *args],
        cwd=ROOT,
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gpu-box.lan"])
def test_a_public_bind_without_a_token_refuses_to_start(tmp_path, host):
    result = serve(tmp_path, "--host", host, "--port", str(free_port()))
    assert result.returncode != 0
    assert "TUNEBOARD_TOKEN" in result.stderr  # says how to fix it
    assert "secrets.token_urlsafe" in result.stderr
    assert "Traceback" not in result.stderr
    assert "running at" not in result.stdout


def test_a_public_bind_with_a_short_token_refuses_to_start(tmp_path):
    result = serve(tmp_path, "--host", "0.0.0.0", "--port", "8000", TUNEBOARD_TOKEN="short")
    assert result.returncode != 0
    assert "at least 16 characters" in result.stderr


def test_a_public_bind_with_a_token_starts_and_every_request_needs_it(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--host", "0.0.0.0"],
        cwd=ROOT,
        env=_env(tmp_path, TUNEBOARD_TOKEN=TOKEN, TUNEBOARD_PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert response.status_code == 401
        ok = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert ok.status_code == 200 and ok.json()["database"] == "ok"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    assert "TUNEBOARD_ALLOWED_HOSTS" in output  # the Host check is explained at start
