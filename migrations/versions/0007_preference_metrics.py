"""metrics: the preference columns (rewards chosen / rejected, margin, accuracy, train and eval)

Nullable floats: rows of sft jobs, and every row written before, leave them empty.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "eval_rewards_chosen",
    "eval_rewards_rejected",
    "eval_reward_margin",
    "eval_reward_accuracy",
)


def upgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
