"""jobs: start_timing, the latest attempt's claim to first optimizer step, in parts

A nullable text (one sentence for the job page): every job written before leaves it empty.

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, not batch mode: batch mode rebuilds `jobs` on SQLite, and dropping the old
# table fails while metrics and adapters refer to it (foreign keys are on). SQLite >= 3.35 has
# ADD COLUMN and DROP COLUMN.
def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("start_timing", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("jobs", "start_timing")
