"""Tag history (which version an alias pointed at, when, and why) and stored pipeline recipes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tag_history",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(71), nullable=False),
        sa.Column("previous_digest", sa.String(71), nullable=True),
        sa.Column("reason", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tag_history_model_tag", "tag_history", ["model_id", "tag"])
    op.create_table(
        "pipelines",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id", ondelete="SET NULL"), nullable=True),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pipelines_tenant_id", "pipelines", ["tenant_id"])
    # existing tags get one history entry each, so rollback has a starting point
    op.execute(
        "INSERT INTO tag_history (model_id, tag, digest, previous_digest, reason, created_at)"
        " SELECT tags.model_id, tags.tag, model_versions.digest, NULL, 'existing tag', tags.updated_at"
        " FROM tags JOIN model_versions ON model_versions.id = tags.version_id"
    )


def downgrade() -> None:
    op.drop_table("pipelines")
    op.drop_table("tag_history")
