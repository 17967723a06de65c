"""Flow control: parked rows, pauses, circuit breakers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NOW = sa.text("clock_timestamp()")


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    s = _schema()
    tstz = pg.TIMESTAMP(timezone=True)
    for table in ("triggers", "outbox"):
        op.add_column(
            table,
            sa.Column("park_on", pg.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'")),
            schema=s,
        )
    op.add_column("outbox", sa.Column("parked_at", tstz, nullable=True), schema=s)
    op.add_column("outbox", sa.Column("parked_reason", sa.Text, nullable=True), schema=s)
    # Parked rows sit at due_at = 'infinity', out of the claim index's way; this small
    # partial index finds a trigger's parked rows to un-park them.
    op.create_index(
        "outbox_parked_idx",
        "outbox",
        ["trigger_id", "id"],
        schema=s,
        postgresql_where=sa.text("parked_at IS NOT NULL"),
    )
    op.create_table(
        "pauses",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("scope", sa.Text, nullable=True),
        sa.Column("trigger_id", sa.BigInteger, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("paused_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pauses_pkey"),
        schema=s,
    )
    op.create_index(
        "pauses_target_key",
        "pauses",
        [sa.text("coalesce(scope, '')"), sa.text("coalesce(trigger_id, 0)")],
        unique=True,
        schema=s,
    )
    op.create_table(
        "breakers",
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'closed'")),
        sa.Column("failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("open_until", tstz, nullable=True),
        sa.Column("opened_at", tstz, nullable=True),
        sa.Column("probe_id", sa.BigInteger, nullable=True),
        sa.Column("opened_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("updated_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("trigger_id", name="breakers_pkey"),
        sa.CheckConstraint("state IN ('closed', 'open', 'half_open')", name="breakers_state_check"),
        schema=s,
    )


def downgrade() -> None:
    s = _schema()
    op.drop_table("breakers", schema=s)
    op.drop_table("pauses", schema=s)
    op.drop_index("outbox_parked_idx", table_name="outbox", schema=s)
    for column in ("parked_reason", "parked_at", "park_on"):
        op.drop_column("outbox", column, schema=s)
    op.drop_column("triggers", "park_on", schema=s)
