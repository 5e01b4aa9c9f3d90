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
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("bundle_checksum", sa.String(length=64), nullable=False),
        sa.Column("is_demo", sa.Boolean(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_embeddings_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_embeddings_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embeddings")),
        sa.UniqueConstraint(
            "sop_instance_uid", "bundle_checksum", name=op.f("uq_embeddings_sop_instance_uid")
        ),
    )
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_embeddings_sop_instance_uid"), ["sop_instance_uid"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_embeddings_study_id"), ["study_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_embeddings_bundle_checksum"), ["bundle_checksum"], unique=False
        )
    # fairness: tables below
    op.create_table(
        "fairness_observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("pipeline", sa.String(length=128), nullable=False),
        sa.Column("bundle_checksum", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("finding", sa.String(length=128), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("sex", sa.String(length=8), nullable=False),
        sa.Column("age_band", sa.String(length=8), nullable=False),
        sa.Column("manufacturer", sa.String(length=32), nullable=False),
        sa.Column("view", sa.String(length=8), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fairness_observations")),
        sa.UniqueConstraint(
            "bundle_checksum",
            "sop_instance_uid",
            "finding",
            name=op.f("uq_fairness_observations_bundle_checksum"),
        ),
    )
    with op.batch_alter_table("fairness_observations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fairness_observations_day"), ["day"], unique=False)
    pass


def downgrade() -> None:
    # fairness: drops below
    with op.batch_alter_table("fairness_observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fairness_observations_day"))
    op.drop_table("fairness_observations")
    # retrieval: drops below
    op.drop_table("embeddings")
    pass
