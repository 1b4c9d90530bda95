"""Alembic environment: migrates `SQLModel.metadata` (app/models.py); batch mode for SQLite."""

from alembic import context
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables)
from app.db import make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=target_metadata, render_as_batch=True, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
