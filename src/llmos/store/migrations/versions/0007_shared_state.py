"""State that several front ends on one database share: token budgets, job runners, and the front ends themselves.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_ledger",
        sa.Column("scope", sa.String(160), primary_key=True),
        sa.Column("period", sa.String(32), primary_key=True),
        sa.Column("committed", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "budget_holds",
        sa.Column("holder", sa.String(32), primary_key=True),
        sa.Column("scope", sa.String(160), primary_key=True),
        sa.Column("period", sa.String(32), primary_key=True),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "front_ends",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("url", sa.String(300), nullable=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("jobs", sa.Column("runner", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("runner")
    op.drop_table("front_ends")
    op.drop_table("budget_holds")
    op.drop_table("budget_ledger")
