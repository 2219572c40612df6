"""Evaluations: measured reports (task metrics) per model version and dataset version.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_name", sa.String(300), nullable=False),
        sa.Column("model_digest", sa.String(71), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("dataset_name", sa.String(300), nullable=True),
        sa.Column("dataset_digest", sa.String(71), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_evaluations_model_digest", "evaluations", ["model_digest"])


def downgrade() -> None:
    op.drop_table("evaluations")
