"""kill -9 of the web server in the middle of an upload: at the next start the temp file is swept
and no dataset (row or folder) is left."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from app.db import Database
from app.models import Dataset
from app.settings import Settings
from devkit.live_server import LiveServer

pytestmark = pytest.mark.slow

BOUNDARY = "tuneboardkilltest"


def _head(port: int, body_length: int) -> bytes:
    return (
        f"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Origin: http://127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {body_length}\r\nConnection: close\r\n\r\n"
    ).encode()


def _multipart(payload_size: int) -> tuple[bytes, bytes]:
    """The multipart body before and after `payload_size` bytes of JSONL rows."""
    before = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.jsonl"\r\nContent-Type: application/jsonl\r\n\r\n'
    ).encode()
    return before, f"\r\n--{BOUNDARY}--\r\n".encode()


def _rows(size: int) -> bytes:
    row = b'{"text": "' + b"x" * 1000 + b'"}\n'
    return (row * (size // len(row) + 1))[:size]


def _leftovers(settings: Settings, db: Database) -> tuple[list[str], list[str], int]:
    temps = sorted(p.name for p in settings.tmp_dir.glob("*"))
    folders = sorted(p.name for p in settings.datasets_dir.glob("*"))
    with db.read() as s:
        rows = len(list(s.exec(select(Dataset))))
    return temps, folders, rows


def _kill_on_temp_file(server: LiveServer, settings: Settings, done: threading.Event) -> None:
    while not done.is_set():
        if any(settings.tmp_dir.glob("upload-*")):
            server.kill()
            return
        time.sleep(0.001)


def test_killed_mid_body_then_mid_copy_the_next_start_leaves_no_trace(tmp_path: Path):
    server = LiveServer(tmp_path / "data").start()
    settings = Settings(data_dir=tmp_path / "data", database_url="")
    db = Database(server.database_url)
    try:
        # 1. Half the body sent, then SIGKILL.
        before, after = _multipart(8 * 1024 * 1024)
        payload = _rows(8 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(_head(server.port, len(before) + len(payload) + len(after)) + before)
            conn.sendall(payload[: len(payload) // 2])
            time.sleep(0.5)
            server.kill()
        server.start()
        assert _leftovers(settings, db) == ([], [], 0)

        # 2. The whole body sent; SIGKILL while the server copies it into the data dir's temp
        # file (polled; a few tries, since the copy is short).
        size = 48 * 1024 * 1024
        before, after = _multipart(size)
        payload = _rows(size)
        caught = None
        for _ in range(4):
            done = threading.Event()
            watcher = threading.Thread(target=_kill_on_temp_file, args=(server, settings, done))
            watcher.start()
            try:
                with socket.create_connection(("127.0.0.1", server.port)) as conn:
                    conn.sendall(_head(server.port, len(before) + size + len(after)) + before)
                    conn.sendall(payload + after)
                    conn.settimeout(60)
                    with contextlib.suppress(OSError):
                        conn.recv(1024)  # the answer, or the connection reset by the kill
            finally:
                done.set()
                watcher.join(timeout=5)
            if server.process is not None and server.process.poll() is not None:
                caught = list(settings.tmp_dir.glob("upload-*"))
                server.start()
                break
            # The upload finished before the watcher saw its temp file: delete it, try again.
            with db.write() as s:
                for row in s.exec(select(Dataset)):
                    s.delete(row)
        assert caught, "never caught the server while it held an upload temp file"
        temps, _, rows = _leftovers(settings, db)
        assert temps == [] and rows == 0
    finally:
        server.stop()
        db.dispose()


def _kill_on_dataset_folder(server: LiveServer, settings: Settings, done: threading.Event) -> None:
    while not done.is_set():
        if any(
            not (p.parent / "split.json").exists()
            for p in settings.datasets_dir.glob("*/original.jsonl")
        ):
            server.kill()
            return
        time.sleep(0.001)


def test_killed_mid_ingest_the_next_start_sweeps_the_dataset_folder(tmp_path: Path):
    server = LiveServer(tmp_path / "data").start()
    settings = Settings(data_dir=tmp_path / "data", database_url="")
    db = Database(server.database_url)
    # A finished ingest whose row is not in this database (another database's, or killed between
    # the last file and the commit): complete datasets are never swept, only half-written ones.
    complete = settings.datasets_dir / ("c" * 32)
    complete.mkdir(parents=True)
    for name in ("original.jsonl", "normalized.jsonl", "split.json"):
        (complete / name).write_text("{}\n")
    try:
        size = 48 * 1024 * 1024
        before, after = _multipart(size)
        payload = _rows(size)
        caught = None
        for _ in range(4):
            done = threading.Event()
            watcher = threading.Thread(
                target=_kill_on_dataset_folder, args=(server, settings, done)
            )
            watcher.start()
            try:
                with socket.create_connection(("127.0.0.1", server.port)) as conn:
                    conn.sendall(_head(server.port, len(before) + size + len(after)) + before)
                    conn.sendall(payload + after)
                    conn.settimeout(60)
                    with contextlib.suppress(OSError):
                        conn.recv(1024)
            finally:
                done.set()
                watcher.join(timeout=5)
            if server.process is not None and server.process.poll() is not None:
                caught = sorted(p.name for p in settings.datasets_dir.iterdir())
                server.start()
                break
            with db.write() as s:  # the ingest won the race: delete it, try again
                for row in s.exec(select(Dataset)):
                    s.delete(row)
                    shutil.rmtree(settings.datasets_dir / row.id, ignore_errors=True)
        assert caught and len(caught) == 2, "never caught the server while it ingested"
        assert _leftovers(settings, db) == ([], [complete.name], 0)
    finally:
        server.stop()
        db.dispose()
