"""A data dir with the demo model, a REALLY trained adapter ("job-1"), the worker's inference
server (a subprocess, as in production) and the web app on a live port. Built once per session."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.db import Database
from app.migrate import upgrade
from app.models import Adapter, Dataset, DatasetStatus, Job, JobStatus, Worker
from app.settings import Settings

ADAPTER_ID = "job-1"
BASE = "demo-tiny-llama"
WORKER_ID = "test-worker"
# A training prompt and the answer the demo data teaches for it.
QUESTION = "How much does the Zephyr Kettle 3000 cost?"
TRAINED_ANSWER = "The Zephyr Kettle 3000 costs 89 euros."
TRAIN_STEPS = 30
# The inference server's secret, handed to it as the worker does (TUNEBOARD_INFERENCE_SECRET).
INFERENCE_SECRET = "test-inference-secret-0123456789"
INFERENCE_AUTH = {"Authorization": f"Bearer {INFERENCE_SECRET}"}


def teaches_the_price(row: dict[str, Any]) -> bool:
    """A demo row that teaches one fact (the price), so a short CPU run learns it exactly."""
    return {m["content"] for m in row["messages"] if m["role"] == "assistant"} == {TRAINED_ANSWER}


def train_adapter(
    model_dir: Path,
    dataset: Path,
    run_dir: Path,
    keep: Callable[[dict[str, Any]], bool] = teaches_the_price,
    **changes: Any,
) -> Path:
    """The recipe's own CPU path (as tests/worker/test_recipe.py drives it) on the rows of
    `dataset` that `keep` keeps; `changes` override the TrainConfig fields set here."""
    from app.train_config import TrainConfig
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    rows = run_dir.with_suffix(".rows.jsonl")
    with dataset.open() as source, rows.open("w") as out:
        for number, line in enumerate(source, start=1):
            row = json.loads(line)
            if keep(row):
                out.write(json.dumps({"line": number, **row}) + "\n")
    defaults: dict[str, Any] = dict(
        dataset_id="0" * 32,
        base_model=BASE,
        max_steps=TRAIN_STEPS,
        micro_batch_size=4,
        grad_accum_steps=1,
        max_seq_len=128,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lr_scheduler="linear",
        lora_r=16,
        lora_alpha=32,
        quantization="nf4",  # falls back to fp32 on the CPU
        eval_fraction=0.0,
        eval_every=1000,
        save_every=1000,
        seed=7,
    )
    config = TrainConfig(**defaults | changes)
    recipe = SFTRecipe(config, model_dir, run_dir, ListSink(), LocalControl(), rows_path=rows)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


@pytest.fixture(scope="session")
def pg_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("playground")
    # A long lease: the test worker row never heartbeats, and must count as alive all session.
    settings = Settings(data_dir=root / "data", database_url="", lease_seconds=86_400)
    settings.ensure_dirs()
    return settings


@pytest.fixture(scope="session")
def pg_db(pg_settings: Settings) -> Iterator[Database]:
    upgrade(pg_settings.resolved_database_url)
    database = Database(pg_settings.resolved_database_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def trained(pg_settings: Settings, pg_db: Database) -> dict[str, Path]:
    """The demo base model registered, and adapter job-1 trained on the demo facts."""
    from app.services.model_registry import register_model
    from worker.demo import build_demo_model, write_demo_dataset

    root = pg_settings.resolved_data_dir.parent
    dataset = write_demo_dataset(root / "demo.jsonl")
    model_dir = build_demo_model(pg_settings.models_dir / BASE, dataset)
    register_model(pg_db, pg_settings, str(model_dir), BASE, is_demo=True)
    started = time.monotonic()
    adapter_dir = train_adapter(model_dir, dataset, pg_settings.runs_dir / "1")
    print(f"trained the test adapter in {time.monotonic() - started:.0f} s")
    with pg_db.write() as s:
        s.add(Dataset(id="0" * 32, name="demo", status=DatasetStatus.ready, rows=300))
        s.flush()
        s.add(
            Job(
                id=1,
                name="kettle facts",
                base_model=BASE,
                dataset_id="0" * 32,
                status=JobStatus.succeeded,
            )
        )
        s.flush()
        s.add(Adapter(id=ADAPTER_ID, job_id=1, name="kettle facts", base_model=BASE))
    return {"model_dir": model_dir, "adapter_dir": adapter_dir, "dataset": dataset}


@pytest.fixture
def dataset_rows(pg_settings: Settings, trained: dict[str, Path]) -> Path:
    """Job 1's dataset on disk: the demo rows that teach the price (the export check asks its
    held-out ones)."""
    rows = pg_settings.layout.normalized_rows("0" * 32)
    rows.parent.mkdir(parents=True, exist_ok=True)
    with trained["dataset"].open() as source, rows.open("w") as out:
        for line in source:
            row = json.loads(line)
            answers = {m["content"] for m in row["messages"] if m["role"] == "assistant"}
            if answers == {TRAINED_ANSWER} and len(row["messages"]) <= 3:
                out.write(json.dumps(row) + "\n")
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_inference_server(
    settings: Settings,
    db: Database,
    worker_id: str,
    *,
    cuda: bool = False,
    quantization: str = "auto",
) -> Iterator[str]:
    """`python -m worker.inference` as the worker starts it, on the CPU unless `cuda`; its URL
    written to the worker row `worker_id`."""
    with db.write() as s:
        if s.get(Worker, worker_id) is None:
            s.add(Worker(id=worker_id, host="localhost", pid=os.getpid()))
    env = {
        **os.environ,
        "TUNEBOARD_DATA_DIR": str(settings.resolved_data_dir),
        "TUNEBOARD_LOG_LEVEL": "WARNING",
        "TUNEBOARD_INFERENCE_SECRET": INFERENCE_SECRET,
    }
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.inference",
            "--port",
            "0",
            "--worker-id",
            worker_id,
            "--quantization",
            quantization,
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        with db.read() as s:
            worker = s.get(Worker, worker_id)
            assert worker is not None and worker.inference_url == url
            assert worker.inference_secret == INFERENCE_SECRET
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def inference_server(pg_settings: Settings, pg_db: Database, trained) -> Iterator[str]:
    """The worker's inference server on the CPU."""
    with running_inference_server(pg_settings, pg_db, WORKER_ID) as url:
        yield url


# --- the streaming protocol over the stdlib (the GPU machine has no httpx) --------------------


def inference_status(url: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/status", headers=INFERENCE_AUTH)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stream_generation(url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
    """POST /generate and read the whole stream: (text, the closing summary, token events)."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=300)
    try:
        connection.request(
            "POST",
            "/generate",
            json.dumps(body),
            {"Content-Type": "application/json", **INFERENCE_AUTH},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        text, summary, events = "", {}, 0
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("done"):
                    summary = event
                elif "token" in event:
                    text += event["token"]
                    events += 1
                else:
                    raise AssertionError(f"an error in the stream: {event}")
        return text, summary, events
    finally:
        connection.close()


def hang_up_after(url: str, body: dict[str, Any], events: int) -> None:
    """POST /generate over a raw socket, read `events` events, and close the connection."""
    data = json.dumps(body).encode()
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=120) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {INFERENCE_SECRET}\r\n".encode()
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        received = b""
        while received.count(b"data: ") < events:
            chunk = sock.recv(4096)
            assert chunk, f"the stream ended after {received!r}"
            received += chunk
        assert b'"done"' not in received, received


def wait_for_generation_end(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """The last generation's summary, once it has finished and nothing generates."""
    deadline = time.monotonic() + timeout
    while True:
        status = inference_status(url)
        last = status["last_generation"]
        if last and last.get("finished") and not status["generating"]:
            return last
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


@pytest.fixture(scope="session")
def web_server(pg_settings: Settings, pg_db: Database, inference_server: str) -> Iterator[str]:
    """The web app (create_app) served by uvicorn on a free loopback port."""
    import uvicorn

    from app.main import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(pg_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "web server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
