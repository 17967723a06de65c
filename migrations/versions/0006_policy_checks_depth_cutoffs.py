"""Policy columns that only hold what the library can run, and a record of depth cutoffs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

The retry-policy columns of triggers and outbox rows get CHECK constraints: a row written by
another client with an unknown backoff kind or a delay no timestamp can hold would otherwise
fail every claim or every settlement batch it is part of. Outbox rows already out of range
are moved to dead_letters (reason ``undecodable``) first; triggers out of range are reset to
the library's defaults and disabled, for an operator to look at.

``depth_cutoffs`` keeps the rows the trigger-depth limit stopped (they are never
dead-lettered, but an operator must be able to count and find them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# dispatcher.core.models.MAX_DELAY_SECONDS and dispatcher.triggers.MAX_TIMEOUT at this
# revision (frozen here: a migration must not change when the library does).
MAX_DELAY = "315360000"
MAX_TIMEOUT = "3600"

POLICY_CHECKS = {
    "retry_kind": "retry_kind IN ('exponential', 'linear', 'constant')",
    # BETWEEN also refuses NaN (greater than every number in Postgres) and infinity.
    "retry_base_delay": f"retry_base_delay BETWEEN 0 AND {MAX_DELAY}",
    "retry_max_delay": f"retry_max_delay BETWEEN 0 AND {MAX_DELAY}",
    "retry_factor": "retry_factor BETWEEN 0 AND 1e300",
    "retry_jitter": "retry_jitter BETWEEN 0 AND 1",
    "max_attempts": "max_attempts BETWEEN 1 AND 1000",
    "max_event_age": (
        f"max_event_age IS NULL OR (max_event_age > 0 AND max_event_age <= {MAX_DELAY})"
    ),
    "timeout": f"timeout > 0 AND timeout <= {MAX_TIMEOUT}",
    "park_on": "park_on <@ ARRAY['permission_denied', 'target_not_found']::text[]",
}
OUTBOX_CHECKS = {
    "counters": "attempts >= 0 AND orphans >= 0 AND depth >= 0",
}


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def _all_hold(checks: dict[str, str]) -> str:
    return " AND ".join(f"coalesce(({c}), false)" for c in checks.values())


def upgrade() -> None:
    s = _schema()
    q = f'"{s}"'
    outbox_ok = _all_hold({**POLICY_CHECKS, **OUTBOX_CHECKS})
    # Rows no dispatcher could run: to dead_letters, with the reason and what was wrong.
    op.execute(
        f"""
        WITH bad AS (
            DELETE FROM {q}.outbox WHERE NOT ({outbox_ok}) RETURNING *
        )
        INSERT INTO {q}.dead_letters (outbox_id, event_id, trigger_id, scope, trigger_name,
            target, registered_by, payload, policy, depth, attempts, reason, errors,
            event_created_at)
        SELECT id, event_id, trigger_id, scope, trigger_name, target, registered_by, payload,
            jsonb_build_object('kind', retry_kind, 'base_delay', retry_base_delay::text,
                'factor', retry_factor::text, 'max_delay', retry_max_delay::text,
                'jitter', retry_jitter::text, 'max_attempts', max_attempts,
                'max_event_age', max_event_age::text, 'timeout', timeout::text,
                'park_on', to_jsonb(park_on)),
            greatest(depth, 0), greatest(attempts, 0), 'undecodable',
            errors || jsonb_build_array(jsonb_build_object('attempt', greatest(attempts, 0) + 1,
                'kind', 'permanent', 'at', clock_timestamp(),
                'message', 'retry-policy columns out of range (found by migration 0006)')),
            created_at
        FROM bad
        """
    )
    triggers_ok = _all_hold(POLICY_CHECKS)
    op.execute(
        f"""
        UPDATE {q}.triggers SET retry_kind = 'exponential', retry_base_delay = 1,
            retry_factor = 2, retry_max_delay = 300, retry_jitter = 0.1, max_attempts = 5,
            max_event_age = NULL, timeout = 30, park_on = '{{}}', enabled = false,
            updated_at = clock_timestamp()
        WHERE NOT ({triggers_ok})
        """
    )
    for table in ("triggers", "outbox"):
        for column, check in POLICY_CHECKS.items():
            op.create_check_constraint(f"{table}_{column}_check", table, check, schema=s)
    for name, check in OUTBOX_CHECKS.items():
        op.create_check_constraint(f"outbox_{name}_check", "outbox", check, schema=s)

    op.create_table(
        "depth_cutoffs",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("outbox_id", sa.BigInteger, nullable=False),
        sa.Column("event_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("trigger_name", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("namespace", sa.Text, nullable=True),
        sa.Column("key", sa.Text, nullable=True),
        sa.Column("root", sa.Text, nullable=True),
        sa.Column("depth", sa.Integer, nullable=False),
        sa.Column("max_depth", sa.Integer, nullable=False),
        sa.Column(
            "cut_at",
            pg.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.PrimaryKeyConstraint("id", name="depth_cutoffs_pkey"),
        schema=s,
    )
    op.create_index("depth_cutoffs_cut_at_idx", "depth_cutoffs", ["cut_at"], schema=s)
    op.create_index(
        "depth_cutoffs_scope_idx", "depth_cutoffs", ["scope", "trigger_id", "cut_at"], schema=s
    )


def downgrade() -> None:
    s = _schema()
    op.drop_table("depth_cutoffs", schema=s)
    for name in OUTBOX_CHECKS:
        op.drop_constraint(f"outbox_{name}_check", "outbox", schema=s, type_="check")
    for table in ("triggers", "outbox"):
        for column in POLICY_CHECKS:
            op.drop_constraint(f"{table}_{column}_check", table, schema=s, type_="check")
