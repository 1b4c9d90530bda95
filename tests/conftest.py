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
