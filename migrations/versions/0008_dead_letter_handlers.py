"""Each dead-letter handler's outcome recorded on its dead letter.

A dead letter may be handed to several handler triggers of its scope. Each one's outcome
(which handler, success or the error, when) is appended to ``dead_letters.handler_outcomes``
as it settles, and any failure leaves the letter ``handler_failed`` whatever the order in
which the handlers finish. Letters resolved before this revision keep an empty list.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column(
        "dead_letters",
        sa.Column(
            "handler_outcomes", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
        ),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_column("dead_letters", "handler_outcomes", schema=_schema())
