"""side work leases: dataset reports and merges get a job's status words, attempts, lease and
error columns, and are claimed through app/side_queue.py

Existing rows keep working: `pending` becomes `queued` (a worker claims it as before), `done`
becomes `succeeded`; a row left `running` counts as attempt 1 with an expired lease, so the next
worker requeues it (its old worker used no lease and cannot be told apart from a dead one).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 05:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = ("queued", "running", "succeeded", "failed")
OLD = {
    "dataset_reports": ("reportstatus", ("pending", "running", "done", "failed")),
    "merge_requests": ("mergestatus", ("pending", "running", "succeeded", "failed")),
}
# old word -> new word, per table (words not listed are the same in both)
RENAMED = {
    "dataset_reports": {"pending": "queued", "done": "succeeded"},
    "merge_requests": {"pending": "queued"},
}


def _change_status_type(
    table: str,
    old: tuple[str, tuple[str, ...]],
    new: tuple[str, tuple[str, ...]],
    words: dict[str, str],
) -> None:
    """Move `table.status` from enum `old` to enum `new`, renaming the values in `words`."""
    (old_name, old_values), (new_name, new_values) = old, new
    if op.get_bind().dialect.name == "postgresql":
        cases = " ".join(f"WHEN '{a}' THEN '{b}'" for a, b in words.items())
        op.execute(
            f"ALTER TABLE {table} ALTER COLUMN status TYPE {new_name} "
            f"USING (CASE status::text {cases} ELSE status::text END)::{new_name}"
        )
        return
    for a, b in words.items():
        op.execute(f"UPDATE {table} SET status = '{b}' WHERE status = '{a}'")
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.alter_column(
            "status",
            existing_type=sa.Enum(*old_values, name=old_name),
            type_=sa.Enum(*new_values, name=new_name),
            existing_nullable=False,
        )


def upgrade() -> None:
    bind = op.get_bind()
    sa.Enum(*NEW, name="sideworkstatus").create(bind, checkfirst=True)
    for table, old in OLD.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("attempt", sa.Integer(), nullable=False, server_default="0")
            )
            batch_op.add_column(
                sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3")
            )
            batch_op.add_column(
                sa.Column("lease_expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
            )
            batch_op.add_column(
                sa.Column("notice", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
            )
            if table == "dataset_reports":
                batch_op.alter_column(
                    "error",
                    new_column_name="error_message",
                    existing_type=sa.String(),
                )
            else:
                batch_op.add_column(
                    sa.Column(
                        "error_kind", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=True
                    )
                )
        _change_status_type(table, old, ("sideworkstatus", NEW), RENAMED[table])
        # A running row was claimed once, by a worker that holds no lease: expire it now.
        op.execute(
            f"UPDATE {table} SET attempt = 1, lease_expires_at = COALESCE(started_at, created_at) "
            "WHERE status = 'running'"
        )
        if bind.dialect.name == "postgresql":
            sa.Enum(name=old[0]).drop(bind, checkfirst=True)


def downgrade() -> None:
    bind = op.get_bind()
    for table, old in OLD.items():
        if bind.dialect.name == "postgresql":
            sa.Enum(*old[1], name=old[0]).create(bind, checkfirst=True)
        back = {b: a for a, b in RENAMED[table].items()}
        _change_status_type(table, ("sideworkstatus", NEW), old, back)
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == "dataset_reports":
                batch_op.alter_column(
                    "error_message",
                    new_column_name="error",
                    existing_type=sa.String(),
                )
            else:
                batch_op.drop_column("error_kind")
            batch_op.drop_column("notice")
            batch_op.drop_column("lease_expires_at")
            batch_op.drop_column("max_attempts")
            batch_op.drop_column("attempt")
    sa.Enum(name="sideworkstatus").drop(bind, checkfirst=True)
