"""Trace context: the emitting caller's W3C ``traceparent`` on every row it enqueues.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-10

``outbox`` and ``dead_letters`` gain ``traceparent`` (text, null when the emitter traced
nothing). The emit functions take it as one more, last argument with a default
(``traceparent text DEFAULT NULL``, one for the whole call in ``emit_many``); callers that pass
eleven arguments are unaffected. A latest-state row replaced in place takes the newest
mutation's. The dispatcher continues that trace in the span of every execution of the row
(``dispatcher.tracing``); a dead letter keeps it, and so do the rows of its handlers and a
replay.

A function cannot gain an argument in place, so the old ones are dropped and the new ones
created (by 0014's frozen builders, with ``trace``), keeping every grant of EXECUTE and the
comment. Downgrade puts 0014's back the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import context, op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

SINGLE_0014 = "uuid, text, text, text, text, jsonb, integer, uuid, integer, boolean, jsonb"
BULK_0014 = (
    "uuid[], text[], text[], text[], text[], jsonb[], integer[], uuid[], integer, boolean, jsonb[]"
)
SINGLE = f"{SINGLE_0014}, text"
BULK = f"{BULK_0014}, text"
TRACE_COMMENT = " traceparent: the W3C trace context of the caller, kept on every row."


def _schema() -> str:
    return str(context.config.attributes.get("schema", "dispatcher"))


def _revision_0014() -> ModuleType:
    path = Path(__file__).with_name("0014_key_ordering.py")
    spec = importlib.util.spec_from_file_location("dispatcher_migration_0014", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the migration {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replace(*, trace: bool) -> None:
    """Drop the emit functions of one revision and create the other's, granting EXECUTE
    again to every role that had it and keeping the comment (less or plus this revision's
    sentence)."""
    s = _schema()
    q = f'"{s}"'
    channel = f"{s}_wake"
    m = _revision_0014()
    pairs = (
        ("emit", SINGLE_0014 if trace else SINGLE, SINGLE if trace else SINGLE_0014, m._emit),
        ("emit_many", BULK_0014 if trace else BULK, BULK if trace else BULK_0014, m._emit_many),
    )
    for name, before, after, build in pairs:
        comment = (
            f"coalesce(obj_description(old_oid, 'pg_proc'), '') || '{TRACE_COMMENT}'"
            if trace
            else f"replace(obj_description(old_oid, 'pg_proc'), '{TRACE_COMMENT}', '')"
        )
        op.execute(f"""
DO $keep$
DECLARE
    old_oid oid := '{q}.{name}({before})'::regprocedure;
    grantees text[];
    remark text;
    g text;
BEGIN
    SELECT coalesce(array_agg(DISTINCT a.grantee::regrole::text), '{{}}') INTO grantees
    FROM pg_proc p, aclexplode(p.proacl) AS a
    WHERE p.oid = old_oid
        AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    remark := {comment};
    DROP FUNCTION {q}.{name}({before});
    {build(s, channel, trace=trace)};
    REVOKE ALL ON FUNCTION {q}.{name}({after}) FROM PUBLIC;
    FOREACH g IN ARRAY grantees LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {q}.{name}({after}) TO %s', g);
    END LOOP;
    EXECUTE format('COMMENT ON FUNCTION {q}.{name}({after}) IS %L', remark);
END
$keep$""")


def upgrade() -> None:
    s = _schema()
    op.add_column("outbox", sa.Column("traceparent", sa.Text, nullable=True), schema=s)
    op.add_column("dead_letters", sa.Column("traceparent", sa.Text, nullable=True), schema=s)
    _replace(trace=True)


def downgrade() -> None:
    s = _schema()
    _replace(trace=False)
    op.drop_column("dead_letters", "traceparent", schema=s)
    op.drop_column("outbox", "traceparent", schema=s)
