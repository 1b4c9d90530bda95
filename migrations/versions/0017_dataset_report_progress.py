"""dataset_reports: progress_done and progress_total, the training rows tokenised so far

A report of a large dataset takes minutes; its rows counted show the worker's stall watchdog
(and the page) that it works. 0 for every report before.

Revision ID: 0017
Revises: 0016
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_reports", schema=None) as batch_op:
        for name in ("progress_done", "progress_total"):
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("dataset_reports", schema=None) as batch_op:
        batch_op.drop_column("progress_total")
        batch_op.drop_column("progress_done")
