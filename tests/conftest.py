"""Shared fixtures: a real SQLite file per test (migrated with alembic), the ASGI app, the demo."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.db import Database
from app.migrate import upgrade
from app.settings import Settings

POSTGRES_URL = os.environ.get(
    "TUNEBOARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# `make test` runs the tests in parallel processes (pytest-xdist): each wipes a database of its
# own, `test_gw0`, `test_gw1`..., made beside `test` on the same server when it is missing.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _create_worker_database() -> None:
    """Where the server answers; where it does not, the PostgreSQL tests skip as they would."""
    import psycopg

    server, name = POSTGRES_URL.replace("+psycopg", "").rsplit("/", 1)
    try:
        with psycopg.connect(f"{server}/postgres", connect_timeout=3, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        pass


if XDIST_WORKER:
    POSTGRES_URL = f"{POSTGRES_URL}_{XDIST_WORKER}"
    _create_worker_database()
    # One OpenMP thread a process (and for the workers and children it starts): torch takes one
    # per core by default, and two test processes, each with trainings of its own, then had their
    # threads spin on each other's cores (`make test` on 2 cores: pytest 17 min, 11 with one).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def own_gpu_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's workers take their per-GPU locks in a folder of the test's own (and pass it
    to the processes they start), so a test never waits on a worker of another test run. And
    they do not evaluate the adapters they train unless a test says so."""
    monkeypatch.setenv("TUNEBOARD_GPU_LOCK_DIR", str(tmp_path / "gpu-locks"))
    # Workers of tests that train fakes do not evaluate what they train (a torch child each);
    # the evaluation tests' workers say "true" (tests/fakes/evaluated_demo.py).
    monkeypatch.setenv("TUNEBOARD_EVALUATE_AFTER_TRAINING", "false")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", database_url="")
    s.ensure_dirs()
    return s


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    yield database
    database.dispose()


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture
def pg_db() -> Iterator[Database]:
    """A migrated, empty PostgreSQL database (the `test` database, wiped before each test)."""
    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
    from sqlalchemy import text

    database = Database(POSTGRES_URL)
    with database.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(POSTGRES_URL)
    yield database
    database.dispose()


@pytest.fixture
def app(settings: Settings, db: Database):
    from app.main import create_app

    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator:
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model and dataset file, built once per test session by `python -m worker.demo`."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo")
    # worker.demo writes the model to <models-dir>/demo-tiny-llama
    model_dir, dataset = root / "demo-tiny-llama", root / "demo-chat.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.demo",
            "--models-dir",
            str(root),
            "--dataset-out",
            str(dataset),
        ],
        check=True,
    )
    return {"model_dir": model_dir, "dataset": dataset}


@pytest.fixture(scope="session")
def evaluated_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The demo job trained by a real worker, and its adapter evaluated by that worker's side loop
    without being asked (tests/fakes/evaluated_demo.py): once a session, shared by every test
    that reads a report. Tests that add evaluations of their own leave the first one as it is."""
    from tests.fakes.evaluated_demo import train_and_evaluate

    demo = train_and_evaluate(tmp_path_factory.mktemp("evaluated") / "data")
    yield demo
    demo.db.dispose()
