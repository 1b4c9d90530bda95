"""Faults a user can fix, made for real: a full disk (a small tmpfs), a database locked by another
process (BEGIN IMMEDIATE held past the busy timeout), a read-only database (an immutable file, a
read-only bind mount; root ignores permission bits, so chmod would prove nothing here). Each gives
a typed error with a hint, /healthz says the database cannot be written, and deletes still free
space on a full disk."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app import queue
from app.db import Database
from app.main import create_app
from app.migrate import upgrade
from app.models import JobStatus, utcnow
from app.settings import Settings
from tests.fakes.jobs import add_dataset, add_job

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False)


def _serve(settings: Settings) -> tuple[Database, TestClient]:
    upgrade(settings.resolved_database_url)
    return Database(settings.resolved_database_url), TestClient(
        create_app(settings), base_url="http://127.0.0.1"
    )


# --- disk full ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Settings]:
    """The whole data dir, database included, on its own 4 MiB tmpfs."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", data)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        settings = Settings(data_dir=data, database_url="")
        settings.ensure_dirs()
        yield settings
    finally:
        _run("umount", "-l", data)


def fill_disk(settings: Settings) -> None:
    """Start from an empty write-ahead log (as after a restart), then fill the disk to the byte."""
    with sqlite3.connect(settings.resolved_data_dir / "tuneboard.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with (settings.resolved_data_dir / "filler").open("wb", buffering=0) as filler:
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"x" * size)


def test_disk_full_is_a_507_that_says_how_much_is_free_and_what_to_delete(tiny_disk):
    db, client = _serve(tiny_disk)
    with client:
        dataset_id = add_dataset(db, tiny_disk)
        fill_disk(tiny_disk)
        config = {"name": "full", "base_model": "demo-tiny-llama", "dataset_id": dataset_id}
        response = client.post("/api/jobs", json=config)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "disk_full"
        assert str(tiny_disk.resolved_data_dir) in error["message"]
        assert " free of 4.0 MB" in error["message"]
        assert "delete datasets" in error["hint"]

        page = client.post(
            "/jobs/new", data=config, headers={"accept": "text/html"}, follow_redirects=False
        )
        assert page.status_code == 507
        assert "free of 4.0 MB" in page.text and "delete datasets" in page.text


def test_an_upload_onto_a_full_disk_is_a_507_and_leaves_no_temp_file(tiny_disk):
    _, client = _serve(tiny_disk)
    with client:
        fill_disk(tiny_disk)
        rows = b'{"instruction": "hi", "output": "yo"}\n' * 3000
        response = client.post("/api/datasets", files={"file": ("chat.jsonl", rows)})
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "disk_full"
        assert list(tiny_disk.tmp_dir.iterdir()) == []


def test_health_and_the_system_page_say_a_full_disk_cannot_be_written(tiny_disk):
    _, client = _serve(tiny_disk)
    with client:
        assert client.get("/healthz").json()["database_writable"] is True
        fill_disk(tiny_disk)
        health = client.get("/healthz").json()
        assert health["status"] == "degraded"
        assert (health["database"], health["database_writable"]) == ("not writable", False)
        assert health["database_problem"]["code"] == "disk_full"
        page = client.get("/system", headers={"accept": "text/html"})
        assert "(not writable)" in page.text and "is full" in page.text


def test_a_dataset_can_be_deleted_on_a_full_disk(tiny_disk):
    _, client = _serve(tiny_disk)
    with client:
        rows = b"".join(
            b'{"instruction": "say %d", "output": "%s"}\n' % (i, b"y" * 1000) for i in range(300)
        )
        uploaded = client.post("/api/datasets", files={"file": ("big.jsonl", rows)})
        assert uploaded.status_code == 201, uploaded.text
        dataset_id = uploaded.json()["id"]
        fill_disk(tiny_disk)

        response = client.delete(f"/api/datasets/{dataset_id}")
        assert response.status_code == 204, response.text
        assert not (tiny_disk.datasets_dir / dataset_id).exists()
        assert client.get(f"/api/datasets/{dataset_id}").status_code == 404


def test_a_finished_job_can_be_deleted_on_a_full_disk(tiny_disk):
    db, client = _serve(tiny_disk)
    with client:
        job = add_job(db, tiny_disk)
        claim = queue.claim_next_job(db, "w1", 60)
        assert claim is not None
        queue.finish(db, job.id, claim.attempt, JobStatus.failed, error_kind="unknown")
        run_dir = tiny_disk.runs_dir / str(job.id)
        run_dir.mkdir()
        (run_dir / "checkpoint.bin").write_bytes(b"\0" * 1_000_000)
        fill_disk(tiny_disk)

        response = client.delete(f"/api/jobs/{job.id}")
        assert response.status_code == 204, response.text
        assert not run_dir.exists()
        assert client.get(f"/api/jobs/{job.id}").status_code == 404


# --- locked -------------------------------------------------------------------------------------

HOLD_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
time.sleep(120)
"""


@contextmanager
def write_lock_held(database: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the database's write lock until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(database)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_database_locked_past_the_busy_timeout_names_the_process_holding_it(tmp_path, db):
    settings = Settings(
        data_dir=tmp_path / "data", database_url="", database_busy_timeout_seconds=0.2
    )
    config = {
        "name": "locked",
        "base_model": "demo-tiny-llama",
        "dataset_id": add_dataset(db, settings),
    }
    with (
        TestClient(create_app(settings), base_url="http://127.0.0.1") as client,
        write_lock_held(settings.resolved_data_dir / "tuneboard.db") as holder,
    ):
        response = client.post("/api/jobs", json=config)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "database_locked"
        assert f"process {holder.pid}" in error["message"]
        assert "0.2 s" in error["message"]
        assert f"kill {holder.pid}" in error["hint"]

        health = client.get("/healthz").json()
        assert health["database_writable"] is False
        assert health["database_problem"]["code"] == "database_locked"


# --- read-only ----------------------------------------------------------------------------------


@pytest.fixture
def immutable_database(settings: Settings, db: Database) -> Iterator[tuple[Path, str]]:
    """The database file marked immutable (root cannot write it either), with one dataset in it."""
    dataset_id = add_dataset(db, settings)
    db.dispose()
    path = settings.resolved_data_dir / "tuneboard.db"
    made = _run("chattr", "+i", path)
    if made.returncode != 0:
        pytest.skip(f"cannot make a file immutable here: {made.stderr.strip()}")
    try:
        yield path, dataset_id
    finally:
        _run("chattr", "-i", path)


def test_an_immutable_database_file_is_a_503_naming_the_file_and_the_fix(
    settings, immutable_database
):
    path, dataset_id = immutable_database
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        config = {"name": "ro", "base_model": "demo-tiny-llama", "dataset_id": dataset_id}
        response = client.post("/api/jobs", json=config)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "database_read_only"
        assert f"{path} is marked immutable" in error["message"]
        assert f"chattr -i {path}" in error["hint"]

        health = client.get("/healthz").json()
        assert (health["database"], health["database_writable"]) == ("not writable", False)
        assert health["database_problem"]["code"] == "database_read_only"


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Settings]:
    """A data dir with a migrated database, then bind-mounted read-only onto itself."""
    settings = Settings(data_dir=tmp_path / "data", database_url="")
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url)
    data = settings.resolved_data_dir
    bound = _run("mount", "--bind", data, data)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        made = _run("mount", "-o", "remount,ro,bind", data)
        assert made.returncode == 0, made.stderr
        yield settings
    finally:
        _run("umount", "-l", data)


def test_a_database_on_a_read_only_mount_names_the_mount_on_pages_and_health(read_only_mount):
    data = read_only_mount.resolved_data_dir
    with TestClient(create_app(read_only_mount), base_url="http://127.0.0.1") as client:
        page = client.get("/jobs", headers={"accept": "text/html"})
        assert page.status_code == 503
        assert f"read-only mount ({data})" in page.text
        assert f"mount -o remount,rw {data}" in page.text

        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["database_problem"]["code"] == "database_read_only"


# --- a job whose end could not be recorded --------------------------------------------------------


def test_a_running_job_whose_lease_expired_reads_as_lost_contact_not_running(settings, db, client):
    job = add_job(db, settings)
    claim = queue.claim_next_job(db, "gone-worker", 60)
    assert claim is not None
    with db.write() as s:  # the worker's last renewal was long ago, and nobody requeued the job
        row = s.get(type(job), job.id)
        assert row is not None
        row.lease_expires_at = utcnow() - timedelta(minutes=10)
        s.add(row)

    page = client.get(f"/jobs/{job.id}", headers={"accept": "text/html"})
    assert "lost contact" in page.text
    assert ">running<" not in page.text
    listed = client.get("/jobs", headers={"accept": "text/html"})
    assert "lost contact" in listed.text

    shown = client.get(f"/api/jobs/{job.id}").json()
    assert shown["status"] == "lost_contact"
    assert shown["error_message"].startswith("No worker has renewed this job's lease since ")
    assert "System page" in shown["error_hint"]
    listed_api = client.get("/api/jobs").json()["jobs"]
    assert [j["status"] for j in listed_api if j["id"] == job.id] == ["lost_contact"]


def test_a_running_job_whose_worker_renews_its_lease_reads_running_in_the_api(settings, db, client):
    job = add_job(db, settings)
    assert queue.claim_next_job(db, "live-worker", 60) is not None
    shown = client.get(f"/api/jobs/{job.id}").json()
    assert shown["status"] == "running"
    assert shown["error_message"] is None


# --- PostgreSQL faults: the same typed errors as SQLite's -----------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_postgresql_server_that_does_not_answer_is_a_503_saying_so(tmp_path):
    port = _closed_port()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/tuneboard"
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    settings.ensure_dirs()
    client = TestClient(create_app(settings), base_url="http://127.0.0.1")

    page = client.get("/api/jobs")
    assert page.status_code == 503
    error = page.json()["error"]
    assert error["code"] == "database_unreachable"
    assert error["message"].startswith(
        f"The PostgreSQL server 127.0.0.1:{port}/tuneboard cannot be reached (connection"
    )
    assert "pg_isready" in error["hint"]
    html = client.get("/jobs", headers={"accept": "text/html"})
    assert html.status_code == 503
    assert "cannot be reached" in html.text

    health = client.get("/healthz").json()
    assert health["database"] == "unreachable"
    assert health["database_problem"]["code"] == "database_unreachable"


def test_a_postgresql_connection_the_server_terminates_is_the_same_clear_error(pg_db, tmp_path):
    from sqlalchemy import text

    from app import faults
    from tests.conftest import POSTGRES_URL

    settings = Settings(data_dir=tmp_path / "data", database_url=POSTGRES_URL)
    with pg_db.engine.connect() as doomed, pg_db.engine.connect() as admin:
        pid = doomed.execute(text("SELECT pg_backend_pid()")).scalar_one()
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.commit()
        with pytest.raises(Exception) as raised:
            doomed.execute(text("SELECT 1"))
    fault = faults.classify(raised.value, settings)
    assert isinstance(fault, faults.DatabaseUnreachable)
    assert "terminating connection" in fault.message
    assert fault.message.startswith("The PostgreSQL server ")
    assert fault.status_code == 503


def test_a_read_only_postgresql_database_is_found_by_the_health_probe(pg_db, tmp_path):
    from sqlalchemy import text

    from tests.conftest import POSTGRES_URL

    name = pg_db.engine.url.database
    settings = Settings(data_dir=tmp_path / "data", database_url=POSTGRES_URL)
    settings.ensure_dirs()
    with pg_db.engine.connect() as admin:
        admin.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        admin.commit()
    try:
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            health = client.get("/healthz").json()
    finally:
        with pg_db.engine.connect() as admin:
            admin.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
            admin.commit()
    problem = health["database_problem"]
    assert health["database_writable"] is False
    assert problem["code"] == "database_read_only"
    assert problem["message"].startswith("The PostgreSQL server ")
    assert "accepts no writes" in problem["message"]
