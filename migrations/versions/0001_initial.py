"""Initial schema: triggers, outbox, dead_letters, abandoned_executions, kv.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NOW = sa.text("clock_timestamp()")


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def _policy() -> list[sa.Column[object]]:
    return [
        sa.Column("retry_kind", sa.Text, nullable=False),
        sa.Column("retry_base_delay", sa.Float, nullable=False),
        sa.Column("retry_factor", sa.Float, nullable=False),
        sa.Column("retry_max_delay", sa.Float, nullable=False),
        sa.Column("retry_jitter", sa.Float, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("max_event_age", sa.Float, nullable=True),
        sa.Column("timeout", sa.Float, nullable=False),
    ]


def upgrade() -> None:
    s = _schema()
    tstz = pg.TIMESTAMP(timezone=True)
    op.create_table(
        "triggers",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("namespace", sa.Text, nullable=False),
        sa.Column("key_pattern", sa.Text, nullable=False),
        sa.Column("pattern_kind", sa.Text, nullable=False),
        sa.Column("match_prefix", sa.Text, nullable=False),
        sa.Column("match_like", sa.Text, nullable=True),
        sa.Column("ops", pg.ARRAY(sa.Text), nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        *_policy(),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column(
            "is_dead_letter_handler", sa.Boolean, nullable=False, server_default=sa.text("false")
        ),
        sa.Column("registered_by", sa.Text, nullable=False),
        sa.Column("created_at", tstz, nullable=False, server_default=NOW),
        sa.Column("updated_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="triggers_pkey"),
        sa.UniqueConstraint("scope", "name", name="triggers_scope_name_key"),
        sa.CheckConstraint(
            "pattern_kind IN ('exact', 'prefix', 'glob')", name="triggers_pattern_kind_check"
        ),
        schema=s,
    )
    op.create_index(
        "triggers_match_idx", "triggers", ["scope", "namespace", "match_prefix"], schema=s
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("event_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("trigger_name", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("registered_by", sa.Text, nullable=False),
        sa.Column("payload", pg.JSONB, nullable=False),
        *_policy(),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("orphans", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("depth", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("due_at", tstz, nullable=False, server_default=NOW),
        sa.Column("lease_token", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("reply_to", sa.Text, nullable=True),
        sa.Column("reply_owner", sa.Text, nullable=True),
        sa.Column("reply_deadline", tstz, nullable=True),
        sa.Column("dead_letter_id", sa.BigInteger, nullable=True),
        sa.Column("errors", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("created_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="outbox_pkey"),
        sa.UniqueConstraint("event_id", "trigger_id", name="outbox_event_trigger_key"),
        schema=s,
        postgresql_with={
            "autovacuum_vacuum_scale_factor": "0.01",
            "autovacuum_vacuum_threshold": "1000",
            "autovacuum_vacuum_insert_scale_factor": "0.05",
            "autovacuum_analyze_scale_factor": "0.02",
            "autovacuum_vacuum_cost_delay": "1",
        },
    )
    op.create_index("outbox_due_idx", "outbox", ["due_at"], schema=s)

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("outbox_id", sa.BigInteger, nullable=False),
        sa.Column("event_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("trigger_name", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("registered_by", sa.Text, nullable=False),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("policy", pg.JSONB, nullable=False),
        sa.Column("depth", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("errors", pg.JSONB, nullable=False),
        sa.Column("resolution", sa.Text, nullable=False, server_default=sa.text("'open'")),
        sa.Column("resolution_note", sa.Text, nullable=True),
        sa.Column("replayed_as", pg.UUID(as_uuid=True), nullable=True),
        sa.Column("event_created_at", tstz, nullable=False),
        sa.Column("dead_lettered_at", tstz, nullable=False, server_default=NOW),
        sa.Column("resolved_at", tstz, nullable=True),
        sa.PrimaryKeyConstraint("id", name="dead_letters_pkey"),
        sa.CheckConstraint(
            "resolution IN ('open', 'handled', 'handler_failed', 'replayed', 'discarded')",
            name="dead_letters_resolution_check",
        ),
        schema=s,
    )
    op.create_index(
        "dead_letters_scope_idx",
        "dead_letters",
        ["scope", "resolution", "dead_lettered_at"],
        schema=s,
    )
    op.create_index(
        "dead_letters_trigger_idx", "dead_letters", ["trigger_id", "dead_lettered_at"], schema=s
    )

    op.create_table(
        "abandoned_executions",
        sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("reply_to", sa.Text, nullable=False),
        sa.Column("event_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("trigger_id", sa.BigInteger, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("result", pg.JSONB, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="abandoned_executions_pkey"),
        sa.CheckConstraint(
            "outcome IN ('success', 'failure')", name="abandoned_executions_outcome_check"
        ),
        schema=s,
    )
    op.create_index(
        "abandoned_executions_created_idx", "abandoned_executions", ["created_at"], schema=s
    )

    op.create_table(
        "kv",
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("namespace", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("value", pg.JSONB, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
        sa.Column("updated_at", tstz, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("scope", "namespace", "key", name="kv_pkey"),
        schema=s,
    )


def downgrade() -> None:
    s = _schema()
    for table in ("kv", "abandoned_executions", "dead_letters", "outbox", "triggers"):
        op.drop_table(table, schema=s)
