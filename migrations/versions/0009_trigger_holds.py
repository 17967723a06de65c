"""A rate limit holds its trigger: the shared retry-after per trigger.

A target that answers "rate limited, retry after N seconds" holds every row of its trigger,
in every process, until then. The hold lives beside the trigger's circuit breaker (one small
table the claim already reads once per statement), as ``breakers.held_until``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    op.add_column(
        "breakers",
        sa.Column("held_until", pg.TIMESTAMP(timezone=True), nullable=True),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_column("breakers", "held_until", schema=_schema())
