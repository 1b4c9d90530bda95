"""hub_imports: ingest_attempt, the web's claims on an import's ingest (fences their writes)

0 for every import before: the next claim on one left ingesting is its first.

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hub_imports", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("ingest_attempt", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("hub_imports", schema=None) as batch_op:
        batch_op.drop_column("ingest_attempt")
