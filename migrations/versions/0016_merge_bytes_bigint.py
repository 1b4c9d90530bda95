"""merge_requests: progress_done, progress_total and size_bytes as bigint

A merged model passes 2 GiB: on PostgreSQL an integer column refused its bytes (its saving
progress, then its size), so a merge of any real model could not record either.

Revision ID: 0016
Revises: 0015
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("progress_done", "progress_total", "size_bytes")


def upgrade() -> None:
    with op.batch_alter_table("merge_requests", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.alter_column(
                name, existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
            )


def downgrade() -> None:
    with op.batch_alter_table("merge_requests", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.alter_column(
                name, existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
            )
