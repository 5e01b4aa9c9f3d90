"""completion conditions per rule, acquisition counts, retention

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rules") as batch_op:
        batch_op.add_column(sa.Column("completion", sa.JSON(), nullable=True))
    with op.batch_alter_table("instances") as batch_op:
        batch_op.add_column(sa.Column("acquisition_number", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("images_in_acquisition", sa.Integer(), nullable=True))
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("series") as batch_op:
        batch_op.add_column(sa.Column("description", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_column("description")
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_column("purged_at")
    with op.batch_alter_table("instances") as batch_op:
        batch_op.drop_column("images_in_acquisition")
        batch_op.drop_column("acquisition_number")
    with op.batch_alter_table("rules") as batch_op:
        batch_op.drop_column("completion")
