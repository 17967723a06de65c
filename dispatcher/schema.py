"""SQLAlchemy table metadata: the schema's source of truth for alembic and the drift test.

The tables live in one Postgres schema whose name the host chooses (default ``dispatcher``);
``build_metadata(schema)`` returns the metadata bound to that name.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, JSONPATH, TIMESTAMP, UUID
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.sql.elements import TextClause

from dispatcher.core.models import MAX_DELAY_SECONDS
from dispatcher.names import (
    DEFAULT_SCHEMA,
    MAX_RECOUNT_INTERVAL,
    MAX_TIMEOUT,
    VERSION_TABLE,
    check_schema_name,
)

# SQLAlchemy's PostgreSQL dialect has the JSONPATH type but does not map it when it reflects
# a table: without this, comparing the migrated schema with this metadata (alembic's
# autogenerate, the drift check) warns about ``triggers.condition_path`` and skips it.
ischema_names.setdefault("jsonpath", JSONPATH)

__all__ = [
    "DEFAULT_SCHEMA",
    "MAX_TIMEOUT",
    "OUTBOX_STORAGE",
    "POLICY_CHECKS",
    "VERSION_TABLE",
    "build_metadata",
    "check_schema_name",
]

# The outbox churns: every row is inserted, updated once or twice and deleted within
# seconds. Vacuum it early and often so dead tuples do not pile up in the claim index.
OUTBOX_STORAGE = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "1",
}


def _now() -> TextClause:
    return text("clock_timestamp()")


def _ts(name: str, *, nullable: bool = False, default: bool = False) -> Column[object]:
    return Column(
        name,
        TIMESTAMP(timezone=True),
        nullable=nullable,
        server_default=_now() if default else None,
    )


# What the policy columns may hold (triggers and outbox alike): only values the library
# writes. A row out of these ranges, written by another client, would fail every claim
# or settlement batch it joined (a delay no timestamp can hold), so Postgres refuses it.
POLICY_CHECKS: dict[str, str] = {
    "retry_kind": "retry_kind IN ('exponential', 'linear', 'constant')",
    # BETWEEN also refuses NaN (greater than every number in Postgres) and infinity.
    "retry_base_delay": f"retry_base_delay BETWEEN 0 AND {MAX_DELAY_SECONDS:.0f}",
    "retry_max_delay": f"retry_max_delay BETWEEN 0 AND {MAX_DELAY_SECONDS:.0f}",
    "retry_factor": "retry_factor BETWEEN 0 AND 1e300",
    "retry_jitter": "retry_jitter BETWEEN 0 AND 1",
    "max_attempts": "max_attempts BETWEEN 1 AND 1000",
    "max_event_age": (
        f"max_event_age IS NULL OR (max_event_age > 0 AND max_event_age <= {MAX_DELAY_SECONDS:.0f})"
    ),
    "timeout": f"timeout > 0 AND timeout <= {MAX_TIMEOUT:.0f}",
    "park_on": "park_on <@ ARRAY['permission_denied', 'target_not_found']::text[]",
}


def _policy_checks(table: str) -> list[CheckConstraint]:
    return [CheckConstraint(c, name=f"{table}_{col}_check") for col, c in POLICY_CHECKS.items()]


def _policy_columns() -> list[Column[object]]:
    return [
        Column("retry_kind", Text, nullable=False),
        Column("retry_base_delay", Float, nullable=False),
        Column("retry_factor", Float, nullable=False),
        Column("retry_max_delay", Float, nullable=False),
        Column("retry_jitter", Float, nullable=False),
        Column("max_attempts", Integer, nullable=False),
        Column("max_event_age", Float, nullable=True),
        Column("timeout", Float, nullable=False),
        Column("park_on", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    ]


def build_metadata(schema: str = DEFAULT_SCHEMA) -> MetaData:
    schema = check_schema_name(schema)
    md = MetaData(schema=schema)

    Table(
        "triggers",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("scope", Text, nullable=False),
        Column("name", Text, nullable=False),
        Column("namespace", Text, nullable=False),
        Column("key_pattern", Text, nullable=False),
        Column("pattern_kind", Text, nullable=False),
        Column("match_prefix", Text, nullable=False),
        Column("match_like", Text, nullable=True),
        Column("ops", ARRAY(Text), nullable=False),
        Column("target", Text, nullable=False),
        *_policy_columns(),
        Column("enabled", Boolean, nullable=False, server_default=text("true")),
        Column("is_dead_letter_handler", Boolean, nullable=False, server_default=text("false")),
        Column("registered_by", Text, nullable=False),
        _ts("created_at", default=True),
        _ts("updated_at", default=True),
        # A condition over the event (dispatcher.core.conditions), as written and compiled
        # (migration 0012); the fields the trigger receives (null: all).
        Column("condition", Text, nullable=True),
        Column("condition_path", JSONPATH, nullable=True),
        Column("condition_vars", JSONB, nullable=True),
        Column("condition_changed", JSONB, nullable=True),
        Column("fields", ARRAY(Text), nullable=True),
        # Per-key ordered delivery and latest-state coalescing (migration 0014).
        Column("ordering", Text, nullable=False, server_default=text("'none'")),
        Column("on_dead_letter", Text, nullable=True),
        Column("delivery", Text, nullable=False, server_default=text("'all'")),
        PrimaryKeyConstraint("id", name="triggers_pkey"),
        UniqueConstraint("scope", "name", name="triggers_scope_name_key"),
        CheckConstraint(
            "pattern_kind IN ('exact', 'prefix', 'glob')", name="triggers_pattern_kind_check"
        ),
        *_policy_checks("triggers"),
        CheckConstraint(
            "ordering IN ('none', 'key') AND delivery IN ('all', 'latest') "
            "AND (ordering = 'key') = (on_dead_letter IS NOT NULL) "
            "AND (on_dead_letter IS NULL OR on_dead_letter IN ('block', 'skip')) "
            "AND (delivery = 'all' OR ordering = 'key')",
            name="triggers_ordering_check",
        ),
        # Emit probes (scope, namespace, match_prefix = ANY(prefixes of the key)): one index
        # lookup per prefix, whatever the number of triggers in the scope.
        Index("triggers_match_idx", "scope", "namespace", "match_prefix"),
    )

    Table(
        "outbox",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("event_id", UUID(as_uuid=True), nullable=False),
        Column("trigger_id", BigInteger, nullable=False),
        Column("scope", Text, nullable=False),
        Column("trigger_name", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("registered_by", Text, nullable=False),
        Column("payload", JSONB, nullable=False),
        *_policy_columns(),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("orphans", Integer, nullable=False, server_default=text("0")),
        Column("depth", Integer, nullable=False, server_default=text("0")),
        # A claimed row's due_at is its lease expiry: one index serves "due" and "lease
        # expired" alike, and the lease token tells a live claim from a new row.
        _ts("due_at", default=True),
        Column("lease_token", UUID(as_uuid=True), nullable=True),
        Column("reply_to", Text, nullable=True),
        Column("reply_owner", Text, nullable=True),
        _ts("reply_deadline", nullable=True),
        Column("dead_letter_id", BigInteger, nullable=True),
        Column("errors", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        _ts("created_at", default=True),
        _ts("parked_at", nullable=True),
        Column("parked_reason", Text, nullable=True),
        # An ordered trigger's row (migration 0014): its key, the key's version at the
        # mutation's commit, and whether dead-lettering it blocks the key. Null otherwise.
        Column("order_key", Text, nullable=True),
        Column("key_seq", BigInteger, nullable=True),
        Column("blocks_key", Boolean, nullable=True),
        # The emitter's W3C trace context, continued by each execution's span (0015).
        Column("traceparent", Text, nullable=True),
        PrimaryKeyConstraint("id", name="outbox_pkey"),
        UniqueConstraint("event_id", "trigger_id", name="outbox_event_trigger_key"),
        *_policy_checks("outbox"),
        CheckConstraint(
            "attempts >= 0 AND orphans >= 0 AND depth >= 0", name="outbox_counters_check"
        ),
        Index("outbox_due_idx", "due_at"),
        Index(
            "outbox_parked_idx",
            "trigger_id",
            "id",
            postgresql_where=text("parked_at IS NOT NULL"),
        ),
        # The claim's "is this row its key's head" probe.
        Index(
            "outbox_key_order_idx",
            "trigger_id",
            "order_key",
            "key_seq",
            postgresql_where=text("order_key IS NOT NULL"),
        ),
        postgresql_with=OUTBOX_STORAGE,
    )

    Table(
        "dead_letters",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("outbox_id", BigInteger, nullable=False),
        Column("event_id", UUID(as_uuid=True), nullable=False),
        Column("trigger_id", BigInteger, nullable=False),
        Column("scope", Text, nullable=False),
        Column("trigger_name", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("registered_by", Text, nullable=False),
        Column("payload", JSONB, nullable=False),
        Column("policy", JSONB, nullable=False),
        Column("depth", Integer, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("reason", Text, nullable=False),
        Column("errors", JSONB, nullable=False),
        Column("resolution", Text, nullable=False, server_default=text("'open'")),
        Column("resolution_note", Text, nullable=True),
        # One entry per dead-letter handler that settled: {trigger_id, trigger, outcome,
        # error, at}, in the order they settled (migration 0008).
        Column("handler_outcomes", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
        Column("replayed_as", UUID(as_uuid=True), nullable=True),
        _ts("event_created_at"),
        _ts("dead_lettered_at", default=True),
        _ts("resolved_at", nullable=True),
        # An ordered trigger's row: its key and version, kept by a replay (migration 0014).
        Column("order_key", Text, nullable=True),
        Column("key_seq", BigInteger, nullable=True),
        Column("traceparent", Text, nullable=True),
        PrimaryKeyConstraint("id", name="dead_letters_pkey"),
        CheckConstraint(
            "resolution IN ('open', 'handled', 'handler_failed', 'replayed', 'discarded')",
            name="dead_letters_resolution_check",
        ),
        Index("dead_letters_scope_idx", "scope", "resolution", "dead_lettered_at"),
        Index("dead_letters_trigger_idx", "trigger_id", "dead_lettered_at"),
        # The console's keyset pages, newest first, over every scope (migration 0013).
        Index("dead_letters_listing_idx", "dead_lettered_at", "id"),
        Index("dead_letters_resolution_listing_idx", "resolution", "dead_lettered_at", "id"),
    )

    Table(
        "abandoned_executions",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("reply_to", Text, nullable=False),
        Column("event_id", UUID(as_uuid=True), nullable=False),
        Column("trigger_id", BigInteger, nullable=False),
        Column("scope", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("status", Integer, nullable=False),
        Column("outcome", Text, nullable=False),
        Column("result", JSONB, nullable=True),
        Column("error", Text, nullable=True),
        _ts("created_at", default=True),
        PrimaryKeyConstraint("id", name="abandoned_executions_pkey"),
        CheckConstraint(
            "outcome IN ('success', 'failure')", name="abandoned_executions_outcome_check"
        ),
        Index("abandoned_executions_created_idx", "created_at"),
    )

    # A pause holds rows of everything (both NULL), a scope, or one trigger.
    Table(
        "pauses",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("scope", Text, nullable=True),
        Column("trigger_id", BigInteger, nullable=True),
        Column("note", Text, nullable=True),
        _ts("paused_at", default=True),
        PrimaryKeyConstraint("id", name="pauses_pkey"),
        Index(
            "pauses_target_key",
            text("coalesce(scope, '')"),
            text("coalesce(trigger_id, 0)"),
            unique=True,
        ),
    )

    # Circuit breakers, shared by every dispatcher process. No row (or "closed") lets a
    # trigger's rows be claimed; "open" holds them until open_until; "half_open" lets only
    # the probe row through. held_until (revision 0009), whatever the state: a target's
    # rate limit holds every row of the trigger until then.
    Table(
        "breakers",
        md,
        Column("trigger_id", BigInteger, nullable=False),
        Column("state", Text, nullable=False, server_default=text("'closed'")),
        Column("failures", Integer, nullable=False, server_default=text("0")),
        _ts("open_until", nullable=True),
        _ts("opened_at", nullable=True),
        Column("probe_id", BigInteger, nullable=True),
        Column("opened_count", Integer, nullable=False, server_default=text("0")),
        _ts("updated_at", default=True),
        _ts("held_until", nullable=True),
        PrimaryKeyConstraint("trigger_id", name="breakers_pkey"),
        CheckConstraint("state IN ('closed', 'open', 'half_open')", name="breakers_state_check"),
    )

    # Rows enqueued by handler writes descending from one root event (a user's mutation):
    # bounds fan-out recursion that stays within the depth limit.
    Table(
        "root_budgets",
        md,
        Column("root_id", UUID(as_uuid=True), nullable=False),
        Column("rows", Integer, nullable=False),
        _ts("created_at", default=True),
        PrimaryKeyConstraint("root_id", name="root_budgets_pkey"),
        Index("root_budgets_created_idx", "created_at"),
    )

    # Rows the trigger-depth limit stopped: never dead-lettered, never run, but kept (for
    # DispatcherConfig.depth_cutoff_retention) so an operator can count and find them.
    Table(
        "depth_cutoffs",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        Column("outbox_id", BigInteger, nullable=False),
        Column("event_id", UUID(as_uuid=True), nullable=False),
        Column("trigger_id", BigInteger, nullable=False),
        Column("scope", Text, nullable=False),
        Column("trigger_name", Text, nullable=False),
        Column("target", Text, nullable=False),
        Column("namespace", Text, nullable=True),
        Column("key", Text, nullable=True),
        Column("root", Text, nullable=True),
        Column("depth", Integer, nullable=False),
        Column("max_depth", Integer, nullable=False),
        _ts("cut_at", default=True),
        PrimaryKeyConstraint("id", name="depth_cutoffs_pkey"),
        Index("depth_cutoffs_cut_at_idx", "cut_at"),
        Index("depth_cutoffs_scope_idx", "scope", "trigger_id", "cut_at"),
    )

    # A scope's cap on its pending outbox rows (revision 0010), checked by the emit
    # functions: ``pending`` is the scope's rows as counted at ``counted_at``, counted again
    # by an emit once older than ``recount_interval`` seconds. No row: no cap.
    Table(
        "backlog_caps",
        md,
        Column("scope", Text, nullable=False),
        Column("max_pending", BigInteger, nullable=False),
        Column("pending", BigInteger, nullable=False, server_default=text("0")),
        _ts("counted_at", nullable=True),
        Column("recount_interval", Float, nullable=False, server_default=text("1.0")),
        _ts("updated_at", default=True),
        PrimaryKeyConstraint("scope", name="backlog_caps_pkey"),
        CheckConstraint("max_pending > 0", name="backlog_caps_max_pending_check"),
        CheckConstraint(
            f"recount_interval > 0 AND recount_interval <= {MAX_RECOUNT_INTERVAL:.0f}",
            name="backlog_caps_recount_interval_check",
        ),
    )

    # What operators did through the console (migration 0013): who, what, on what or by
    # which filter, how many rows, when. Only ever inserted.
    Table(
        "audit_log",
        md,
        Column("id", BigInteger, Identity(), nullable=False),
        _ts("at", default=True),
        Column("actor", Text, nullable=False),
        Column("action", Text, nullable=False),
        Column("scope", Text, nullable=True),
        Column("target", Text, nullable=True),
        Column("filter", JSONB, nullable=True),
        Column("count", BigInteger, nullable=False, server_default=text("0")),
        Column("detail", JSONB, nullable=True),
        PrimaryKeyConstraint("id", name="audit_log_pkey"),
        CheckConstraint("count >= 0", name="audit_log_count_check"),
        Index("audit_log_at_idx", "at"),
    )

    # The last version of each key an ordered trigger has matched (migration 0014); an emit
    # bumps it under the row's lock, so versions follow the commit order of the key's
    # mutations.
    Table(
        "key_versions",
        md,
        Column("scope", Text, nullable=False),
        Column("namespace", Text, nullable=False),
        Column("key", Text, nullable=False),
        Column("version", BigInteger, nullable=False),
        _ts("updated_at", default=True),
        PrimaryKeyConstraint("scope", "namespace", "key", name="key_versions_pkey"),
    )

    # The keys of ordered triggers whose head dead-lettered with on_dead_letter = 'block':
    # their later rows wait until an operator replays, discards or skips the dead letter.
    Table(
        "blocked_keys",
        md,
        Column("trigger_id", BigInteger, nullable=False),
        Column("order_key", Text, nullable=False),
        Column("scope", Text, nullable=False),
        Column("trigger_name", Text, nullable=False),
        Column("dead_letter_id", BigInteger, nullable=False),
        Column("key_seq", BigInteger, nullable=True),
        _ts("blocked_at", default=True),
        PrimaryKeyConstraint("trigger_id", "order_key", name="blocked_keys_pkey"),
        Index("blocked_keys_dead_letter_idx", "dead_letter_id"),
        Index("blocked_keys_scope_idx", "scope", "blocked_at"),
    )

    Table(
        "kv",
        md,
        Column("scope", Text, nullable=False),
        Column("namespace", Text, nullable=False),
        Column("key", Text, nullable=False),
        Column("value", JSONB, nullable=False),
        Column("version", BigInteger, nullable=False, server_default=text("1")),
        _ts("updated_at", default=True),
        PrimaryKeyConstraint("scope", "namespace", "key", name="kv_pkey"),
    )
    return md
