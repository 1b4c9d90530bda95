"""`alembic upgrade head` on an empty database gives exactly the tables app/models.py declares."""

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel, select

import app.models  # noqa: F401
from app.migrate import upgrade


def _diff(db):
    with db.engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), SQLModel.metadata
        )


def test_sqlite_migration_matches_the_models(db):
    assert _diff(db) == []


@pytest.mark.postgres
def test_postgresql_migration_matches_the_models(pg_db):
    assert _diff(pg_db) == []


def test_sqlite_runs_in_wal_with_full_sync_and_foreign_keys(db, settings):
    with db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    path = settings.resolved_data_dir / "tuneboard.db"
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _rows_before_side_work_leases(url: str) -> None:
    """At revision 0005 (before side-work leases): a report and a merge in each status, as the old code left them."""
    upgrade(url, "0005")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO datasets (id, name, original_filename, file_type, format, status,"
                " size_bytes, rows, valid_rows, dropped_rows, error_count, eval_rows, split_seed,"
                " is_demo, created_at) VALUES ('d', 'd', '', '', '', 'ready', 0, 1, 1, 0, 0, 0,"
                " 42, false, '2026-12-01 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, base_model, dataset_id, status, position, attempt,"
                " max_attempts, cancel_requested, oom_retries, progress_step, progress_total,"
                " epoch, download_done_bytes, download_total_bytes, resume_from_scratch,"
                " created_at, updated_at) VALUES (1, 'j', 'm', 'd', 'succeeded', 1, 1, 3, false,"
                " 0, 0, 0, 0, 0, 0, false, '2026-12-01 10:00:00', '2026-12-01 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO adapters (id, job_id, name, base_model, size_bytes, created_at)"
                " VALUES ('job-1', 1, 'j', 'm', 0, '2026-12-01 10:00:00')"
            )
        )
        for n, status in enumerate(("pending", "running", "done", "failed"), start=1):
            conn.execute(
                text(
                    "INSERT INTO dataset_reports (id, dataset_id, base_model, max_seq_len,"
                    " train_on, status, error, created_at, started_at) VALUES (:n, 'd', 'm', 64,"
                    " 'all', :status, :error, '2026-12-01 10:00:00', '2026-12-01 10:00:01')"
                ),
                {"n": n, "status": status, "error": "bad" if status == "failed" else None},
            )
        for n, status in enumerate(("pending", "running", "succeeded", "failed"), start=1):
            conn.execute(
                text(
                    "INSERT INTO merge_requests (id, adapter_id, status, stage, progress_done,"
                    " progress_total, size_bytes, created_at, started_at) VALUES (:n, 'job-1',"
                    " :status, '', 0, 0, 0, '2026-12-01 10:00:00', '2026-12-01 10:00:01')"
                ),
                {"n": n, "status": status},
            )
    engine.dispose()


def _side_work_rows_keep_working(url: str) -> None:
    from app import side_queue
    from app.db import Database
    from app.models import DatasetReport, MergeRequest, SideWorkStatus

    upgrade(url)
    db = Database(url)
    try:
        with db.read() as s:
            reports = {r.id: r for r in s.exec(select(DatasetReport))}
            merges = {m.id: m for m in s.exec(select(MergeRequest))}
        assert [reports[n].status for n in (1, 2, 3, 4)] == list(SideWorkStatus)
        assert [merges[n].status for n in (1, 2, 3, 4)] == list(SideWorkStatus)
        assert reports[4].error_message == "bad"
        assert {(r.attempt, r.max_attempts) for r in [reports[1], merges[1]]} == {(0, 3)}
        # The pending rows are claimed as before; the rows left running by a worker that held no
        # lease are requeued at once (attempt 1 of 3), then claimed as attempt 2.
        assert side_queue.requeue_expired(db) == {"dataset_report": [2], "merge": [2]}
        for kind in ("dataset_report", "merge"):
            first = side_queue.claim_next(db, kind, "w", lease_seconds=60)
            second = side_queue.claim_next(db, kind, "w", lease_seconds=60)
            assert (first, second) == (
                side_queue.SideClaim(kind, 1, 1),
                side_queue.SideClaim(kind, 2, 2),
            )
            assert side_queue.claim_next(db, kind, "w", lease_seconds=60) is None
    finally:
        db.dispose()
    assert _diff(Database(url)) == []


def test_sqlite_side_work_rows_migrate_and_keep_working(settings):
    _rows_before_side_work_leases(settings.resolved_database_url)
    _side_work_rows_keep_working(settings.resolved_database_url)


@pytest.mark.postgres
def test_postgresql_side_work_rows_migrate_and_keep_working(pg_db):
    with pg_db.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    _rows_before_side_work_leases(pg_db.url)
    _side_work_rows_keep_working(pg_db.url)


def test_the_side_work_migration_downgrades(settings):
    from alembic import command

    from app.migrate import alembic_config

    url = settings.resolved_database_url
    _rows_before_side_work_leases(url)
    engine = create_engine(url)

    def statuses() -> list[str]:
        with engine.connect() as conn:
            query = text("SELECT status FROM dataset_reports ORDER BY id")
            return list(conn.execute(query).scalars())

    upgrade(url)
    assert statuses() == ["queued", "running", "succeeded", "failed"]
    command.downgrade(alembic_config(url), "0005")
    assert statuses() == ["pending", "running", "done", "failed"]
    engine.dispose()
