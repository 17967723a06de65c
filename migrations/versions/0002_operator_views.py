"""Operator views: dead_letter_summary and outbox_lag.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Plain views an operator (or a monitoring query) can read with any SQL client, without the
CLI. They hold no data, so they are dropped and recreated freely.
"""

from __future__ import annotations

from alembic import context, op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    s = f'"{_schema()}"'
    op.execute(
        f"""
        CREATE VIEW {s}.dead_letter_summary AS
        SELECT scope, trigger_name, reason, resolution, count(*) AS count,
            min(dead_lettered_at) AS oldest, max(dead_lettered_at) AS newest
        FROM {s}.dead_letters
        GROUP BY scope, trigger_name, reason, resolution
        """
    )
    # A claimed row's due_at is its lease expiry: a future due_at with a lease token is a
    # live claim, a past one is claimable again and counts as due. The clock is read once
    # per query (a sub-select with a volatile function is not inlined), so every row is
    # compared with the same instant.
    op.execute(
        f"""
        CREATE VIEW {s}.outbox_lag AS
        SELECT o.scope, o.trigger_name,
            count(*) FILTER (WHERE o.due_at <= c.now) AS due_now,
            count(*) FILTER (WHERE o.due_at > c.now AND o.lease_token IS NULL) AS scheduled,
            count(*) FILTER (WHERE o.due_at > c.now AND o.lease_token IS NOT NULL) AS leased,
            coalesce(
                extract(epoch FROM c.now - min(o.due_at) FILTER (WHERE o.due_at <= c.now)),
                0
            )::float8 AS oldest_due_seconds
        FROM {s}.outbox o
        CROSS JOIN (SELECT clock_timestamp() AS now) AS c
        GROUP BY o.scope, o.trigger_name, c.now
        """
    )


def downgrade() -> None:
    s = f'"{_schema()}"'
    op.execute(f"DROP VIEW IF EXISTS {s}.outbox_lag")
    op.execute(f"DROP VIEW IF EXISTS {s}.dead_letter_summary")
