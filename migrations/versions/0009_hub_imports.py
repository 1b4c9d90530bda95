"""hub_imports: datasets imported from the Hugging Face Hub, as side work a worker claims

A new table; nothing else changes.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = ("queued", "running", "succeeded", "failed")


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    # The side-work status type exists (migration 0006): PostgreSQL must not create it again.
    status = sa.Enum(*STATUS, name="sideworkstatus").with_variant(
        postgresql.ENUM(*STATUS, name="sideworkstatus", create_type=False), "postgresql"
    )
    op.create_table(
        "hub_imports",
        sa.Column("status", status, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", text(length=200), nullable=True),
        sa.Column("lease_expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("notice", text(), nullable=True),
        sa.Column("error_kind", text(length=50), nullable=True),
        sa.Column("error_message", text(), nullable=True),
        sa.Column("error_hint", text(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hub_id", text(length=200), nullable=False),
        sa.Column("config_name", text(length=200), nullable=True),
        sa.Column("split", text(length=200), nullable=False),
        sa.Column("column_mapping", sa.JSON(), nullable=True),
        sa.Column("name", text(length=200), nullable=False),
        sa.Column("drop_bad_rows", sa.Boolean(), nullable=False),
        sa.Column("stage", text(length=50), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("rows_file", text(length=500), nullable=True),
        sa.Column("dataset_id", text(length=32), nullable=True),
        sa.Column("ingest_error", text(), nullable=True),
        sa.Column("ingest_hint", text(), nullable=True),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("hub_imports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hub_imports_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("hub_imports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hub_imports_status"))
    op.drop_table("hub_imports")
