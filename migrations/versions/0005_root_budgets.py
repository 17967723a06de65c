"""Per-root execution budgets: how many rows the handler writes of one root event enqueued.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "root_budgets",
        sa.Column("root_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column(
            "created_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("root_id", name="root_budgets_pkey"),
        schema=s,
    )
    op.create_index("root_budgets_created_idx", "root_budgets", ["created_at"], schema=s)


def downgrade() -> None:
    op.drop_table("root_budgets", schema=_schema())
