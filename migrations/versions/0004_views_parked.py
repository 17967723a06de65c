"""outbox_lag counts parked rows apart.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

Parked rows (0003) sit at due_at = 'infinity' with parked_at set; the 0002 view counted them
as scheduled. The view gets a ``parked`` column and the other three states leave parked rows
out, as ``dispatcher status`` does. CREATE OR REPLACE VIEW can only append columns, and the
new one belongs next to the other counts, so the view is dropped and created again (it holds
no data); the downgrade restores the 0002 definition.
"""

from __future__ import annotations

from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def upgrade() -> None:
    s = f'"{_schema()}"'
    op.execute(f"DROP VIEW IF EXISTS {s}.outbox_lag")
    # As in 0002: a claimed row's due_at is its lease expiry, and the clock is read once per
    # query (a sub-select with a volatile function is not inlined).
    op.execute(
        f"""
        CREATE VIEW {s}.outbox_lag AS
        SELECT o.scope, o.trigger_name,
            count(*) FILTER (WHERE o.parked_at IS NULL AND o.due_at <= c.now) AS due_now,
            count(*) FILTER (
                WHERE o.parked_at IS NULL AND o.due_at > c.now AND o.lease_token IS NULL
            ) AS scheduled,
            count(*) FILTER (
                WHERE o.parked_at IS NULL AND o.due_at > c.now AND o.lease_token IS NOT NULL
            ) AS leased,
            count(*) FILTER (WHERE o.parked_at IS NOT NULL) AS parked,
            coalesce(
                extract(epoch FROM c.now - min(o.due_at) FILTER (
                    WHERE o.parked_at IS NULL AND o.due_at <= c.now
                )),
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
