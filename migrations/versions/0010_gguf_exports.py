"""model_exports: GGUF, LoRA GGUF and merged-model exports of an adapter, as side work

A new table built on the side-work columns (status, attempt, lease, errors) with the export's own:
kind, quantization, progress, the file, its sha256 and the check of its answers.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The side-work status type exists already (0006): PostgreSQL must not create it again.
    words = ("queued", "running", "succeeded", "failed")
    status = sa.Enum(*words, name="sideworkstatus").with_variant(
        postgresql.ENUM(*words, name="sideworkstatus", create_type=False), "postgresql"
    )
    op.create_table(
        "model_exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", status, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("lease_expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("notice", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("error_kind", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=True),
        sa.Column("error_message", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("error_hint", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("adapter_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("quantization", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=True),
        sa.Column("stage", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("estimate_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_path", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("check_status", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("check_details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_exports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_exports_adapter_id"), ["adapter_id"])
        batch_op.create_index(batch_op.f("ix_model_exports_status"), ["status"])


def downgrade() -> None:
    with op.batch_alter_table("model_exports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_exports_status"))
        batch_op.drop_index(batch_op.f("ix_model_exports_adapter_id"))
    op.drop_table("model_exports")
