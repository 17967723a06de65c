"""The operator console's audit log, and the indexes its dead-letter list reads.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08

``audit_log`` holds one row per action an operator took through the console (``dispatcher
console``): who (``actor``: the authenticated user, or ``local`` on a loopback bind without
authentication), what (``action``, e.g. ``dead_letters.replay``, ``flow.pause``), on what
(``scope``: the one scope it touched, null for several or all; ``target``: a dead letter,
a trigger, a scope; null for a bulk action by filter), the
filter a bulk action applied (``filter``, JSON), how many rows it changed (``count``),
extra details (``detail``, JSON: the replay policy, the note) and when (``at``, the database
clock). Rows are only ever inserted.

The console lists dead letters newest first, ``ORDER BY dead_lettered_at DESC, id DESC``,
one page at a time from a keyset cursor. ``dead_letters_scope_idx`` (scope, resolution,
dead_lettered_at) and ``dead_letters_trigger_idx`` (trigger_id, dead_lettered_at) serve a
list narrowed to a scope or a trigger; two more serve the lists over every scope:
``dead_letters_listing_idx`` (dead_lettered_at, id) for any resolution and
``dead_letters_resolution_listing_idx`` (resolution, dead_lettered_at, id) for one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    s = _schema()
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column(
            "at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=True),
        sa.Column("target", sa.Text, nullable=True),
        sa.Column("filter", pg.JSONB, nullable=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("detail", pg.JSONB, nullable=True),
        sa.PrimaryKeyConstraint("id", name="audit_log_pkey"),
        sa.CheckConstraint("count >= 0", name="audit_log_count_check"),
        sa.Index("audit_log_at_idx", "at"),
        schema=s,
    )
    op.create_index(
        "dead_letters_listing_idx", "dead_letters", ["dead_lettered_at", "id"], schema=s
    )
    op.create_index(
        "dead_letters_resolution_listing_idx",
        "dead_letters",
        ["resolution", "dead_lettered_at", "id"],
        schema=s,
    )


def downgrade() -> None:
    s = _schema()
    op.drop_index("dead_letters_resolution_listing_idx", "dead_letters", schema=s)
    op.drop_index("dead_letters_listing_idx", "dead_letters", schema=s)
    op.drop_table("audit_log", schema=s)
