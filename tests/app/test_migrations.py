"""`alembic upgrade head` on an empty database gives exactly the tables app/models.py declares."""

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import app.models  # noqa: F401


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
